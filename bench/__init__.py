"""`mtpd bench`: the speed of every configuration, side by side in one run."""

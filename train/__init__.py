"""`mtpd train-mtp` and `mtpd eval-mtp`: give a frozen model an MTP head by self-distillation."""

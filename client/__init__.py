"""The client SDK (Client, AsyncClient), knowing only the gRPC contract in protos/.

Built by the public-interface issue.
"""

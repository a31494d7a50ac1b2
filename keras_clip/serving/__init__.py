"""Serving a CLIP export: the protocol's names and limits (`protocol`), a gRPC client
(`client.CLIPClient`) and a local TF Serving stand-in (`local_server`).

The command lines are `serving/cli.py` and `serving/local_server.py`.
"""

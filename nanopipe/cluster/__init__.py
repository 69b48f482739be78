"""The cluster: frames on the wire, the handshake, a worker stage, the leader, a client.

Imports point one way: cluster -> engine -> model/weights/decoding; nothing here imports
the web app or the tools."""

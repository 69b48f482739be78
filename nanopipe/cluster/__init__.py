"""The cluster: frames on the wire (wire), the handshake (net), a worker stage (worker), the leader
(leader, with its workers and ring in ring and its client protocol in clients), a client (client).

Imports point one way: cluster -> engine -> model/weights/decoding; nothing here imports
the web app or the tools."""

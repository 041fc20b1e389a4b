"""The network lab: what TCP and TLS are doing under each connection (pure decoders and the
connection table; the socket reads are in `balancer.io.lab`)."""

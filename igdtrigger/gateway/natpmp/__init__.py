"""NAT-PMP (RFC 6886) and PCP (RFC 6887): sans-I/O codec, UDP transport, the two backends."""

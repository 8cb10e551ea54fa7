"""seqface-dist: distributed SeqFace training (LSR + DSA) from identities and face sequences."""

__version__ = "0.1.0"

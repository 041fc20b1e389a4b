"""Local certificate authority for the testbed (trustme + cryptography); see ca/core.py."""

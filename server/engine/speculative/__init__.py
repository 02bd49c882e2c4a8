"""Speculative decoding: proposals per row, verified in one forward under each row's own adapter."""

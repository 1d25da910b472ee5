"""Candidate detection on S_corr, triplet stamps and fake injection."""

"""Candidate detection on S_corr, triplet stamps and fake injection."""

from astrid.detect.candidates import CANDIDATE_COLUMNS, find_candidates, find_peaks

__all__ = ["CANDIDATE_COLUMNS", "find_candidates", "find_peaks"]

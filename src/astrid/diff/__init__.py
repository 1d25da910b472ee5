"""Image differencing: alignment, background, PSF, ZOGY with S_corr, and the Gaussian baseline.

Public API is filled in as the modules land; see docs/interfaces.md ("Differencing").
"""

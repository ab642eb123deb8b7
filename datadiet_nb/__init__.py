"""datadiet-nb: class-wise effects of Data Diet pruning (EL2N / GraNd) on image classifiers."""

__version__ = "0.1.0"

# Bump when a change to scoring or training code would change stored numbers:
# it is part of every store key, so old artefacts are never reused for new code.
CODE_VERSION = "3"

"""`python -m adam_ext [--device cuda] [--scale full]`: check the fused op against adam.info_nce on this
machine (adam_ext/selfcheck.py); exit status 1 when a kernel disagrees."""
import sys

from .selfcheck import main

sys.exit(main())

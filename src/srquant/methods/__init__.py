"""Quantization methods, one module each, registered here once (see `srquant.methods.registry`)."""

from srquant.methods.adabm import ADABM
from srquant.methods.granular_dq import GRANULAR_DQ
from srquant.methods.ptq import DOBI, MINMAX, PERCENTILE
from srquant.methods.registry import register_method
from srquant.methods.twodquant import TwoDQuant

for _method in (MINMAX, PERCENTILE, DOBI, TwoDQuant(), ADABM, GRANULAR_DQ):
    register_method(_method)

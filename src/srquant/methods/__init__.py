"""Quantization methods, one module each, registered here once (see `srquant.methods.registry`)."""

from srquant.methods.adabm import ADABM
from srquant.methods.dbdc_pac import DBDCPac
from srquant.methods.granular_dq import GRANULAR_DQ
from srquant.methods.ptq import DOBI, MINMAX, PERCENTILE
from srquant.methods.recon import Recon
from srquant.methods.registry import register_method
from srquant.methods.twodquant import TwoDQuant

for _method in (MINMAX, PERCENTILE, DBDCPac(), DOBI, TwoDQuant(), Recon(), ADABM, GRANULAR_DQ):
    register_method(_method)

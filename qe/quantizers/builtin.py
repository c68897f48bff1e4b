"""Built-in quantizers (registered through the ``qe_quantizers`` hook)."""

from qe.hookspecs import hookimpl
from qe.quantizers.gptq import GPTQ
from qe.quantizers.rtn import RTN


@hookimpl
def qe_quantizers():
    return [RTN, GPTQ]

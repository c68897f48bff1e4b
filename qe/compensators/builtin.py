"""Built-in compensators (registered through the ``qe_compensators`` hook)."""

from qe.compensators.lowrank import LowRankCompensator
from qe.compensators.none import NoCompensation
from qe.compensators.quant_experts import QuantExperts
from qe.hookspecs import hookimpl


@hookimpl
def qe_compensators():
    return [NoCompensation, LowRankCompensator, QuantExperts]

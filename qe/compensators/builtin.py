"""Built-in compensators (registered through the ``qe_compensators`` hook)."""

from qe.compensators.none import NoCompensation
from qe.hookspecs import hookimpl


@hookimpl
def qe_compensators():
    return [NoCompensation]

"""The trivial compensator: quantization error left as it is."""

from qe.compensators.base import Compensator


class NoCompensation(Compensator):
    """No compensation: the quantized layer alone."""

    name = "none"

    def needs_calibration(self) -> bool:
        return False

"""The commands behind ``qe analyze``, ``qe quantize``, ``qe compare``, ``qe eval`` and ``qe info``:
each module is one command, usable from Python; :mod:`qe.cli` only parses arguments."""

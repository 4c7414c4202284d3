"""Seeds derived from a run's seed and positions (iteration, epoch, process, ...): every random draw of a run
is a pure function of them, so a resumed run repeats the uninterrupted one and processes agree."""


def derive_seed(*parts: int) -> int:
    """One seed from several integers, stable across runs, processes and machines."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2 ** 63)
    return value

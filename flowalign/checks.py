"""Cross-field rules of a run, checked before any weights load: the method's and modifiers' own rules,
the combinations they declare, what a real model needs, and what runs on more than one process."""
from __future__ import annotations

from .config import RunConfig
from .methods import combines, get_method, modifiers
from .typed import ConfigError


def check_run(cfg: RunConfig, where: str = "config") -> None:
    """Every rule that does not depend on the machine; a one-line ConfigError naming the fields."""
    t = cfg.train
    method = get_method(cfg.method)
    known = modifiers()
    try:
        method.check(cfg.options, t, cfg.modifiers)
        for name, options in cfg.modifiers.items():
            modifier = known[name]
            if not combines(modifier, method):
                raise ConfigError(f"modifiers.{name} ({modifier.title}) does not combine with method {cfg.method}")
            needed = modifier.requires.get(cfg.method)
            if needed and needed not in cfg.modifiers:
                raise ConfigError(f"modifiers.{name} ({modifier.title}) with method {cfg.method} needs "
                                  f"modifiers.{needed} too")
            modifier.check(options, cfg.method, cfg.options, t, cfg.modifiers)
        if not t.cfg and t.guidance != 1.0:
            raise ConfigError("train.cfg=false trains the conditional velocity: it needs train.guidance=1")
        if cfg.reward.aggregate == "advantage" and method.family != "policy_gradient":
            raise ConfigError(f"reward.aggregate=advantage normalises each reward within its groups' advantages: "
                              f"method {cfg.method} has none (use reward.aggregate=reward)")
        if cfg.reward.on_error == "skip" and method.family != "policy_gradient":
            raise ConfigError(f"reward.on_error=skip: method {cfg.method} cannot train around skipped samples yet "
                              "(use reward.on_error=stop)")
        if not cfg.reward.weights:
            raise ConfigError("reward.weights: expected at least one reward")
        from .rewards.registry import available

        unknown = [n for n in cfg.reward.weights if n not in available()]
        if unknown:
            raise ConfigError(f"reward.weights: unknown reward '{unknown[0]}' (flowalign rewards list shows them)")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def check_training(cfg: RunConfig, num_processes: int) -> None:
    """Rules for a training run on ``num_processes`` processes: a prompt source for real models, and the
    parts that keep an iteration's samples together on one process."""
    from .generators import toy_world

    t = cfg.train
    if toy_world(cfg.model.name) is None and not t.prompt_file:
        raise ConfigError(f"model '{cfg.model.name}' is not a toy model: set train.prompt_file (one prompt per line)")
    method = get_method(cfg.method)
    if num_processes > 1:
        reasons = [(f"method {cfg.method}", method.single_process)]
        reasons += [(f"modifiers.{n}", modifiers()[n].single_process) for n in cfg.modifiers]
        reasons += [(f"reward {n}", "it judges whole groups, which span processes")
                    for n in cfg.reward.weights if _pairwise(n)]
        for what, why in reasons:
            if why:
                raise ConfigError(f"{what} runs on one process ({why}); this run has {num_processes}")
    spread = method.family == "flow_matching" or not getattr(method, "shares_trunks", False)
    total = t.prompts_per_iteration * get_method(cfg.method)(cfg.options, t).samples_per_prompt
    if spread and total % num_processes:
        raise ConfigError(f"train.prompts_per_iteration x samples per prompt = {total} must be divisible by the "
                          f"number of processes ({num_processes})")


def _pairwise(name: str) -> bool:
    from .rewards import PairwiseReward
    from .rewards.registry import reward_class

    cls = reward_class(name)
    return isinstance(cls, type) and issubclass(cls, PairwiseReward)

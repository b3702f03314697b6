"""Names of model.init_strategy's strategies (models/init_strategy.py), importable without torch for validation."""

STRATEGY_NAMES = ("normal", "zero", "uniform", "xavier_uniform", "xavier_normal", "kaiming_uniform",
                  "kaiming_normal", "orthogonal")
TOKEN_INITS = ("mean", "text") + STRATEGY_NAMES  # model.new_token_init

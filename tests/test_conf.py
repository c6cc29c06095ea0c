"""Every YAML in conf/ composes against its typed schema (a typo in a preset fails here)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from minitron_megatron.cli.app import CONF_DIR
from minitron_megatron.config.commands import SCHEMAS, register_configs
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.model import parameter_count, validate_model
from minitron_megatron.config.parallel import ParallelConfig

CONF = Path(CONF_DIR)
COMMANDS = sorted(SCHEMAS)
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DATAS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
LAUNCHERS = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
# SmolLM2-135M-Instruct as its import gives it (tests/test_smollm2_recipe.py checks the count).
IMPORTED_TEACHERS = {"smollm2": ModelConfig(
    name="smollm2", num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
    kv_channels=64, max_position_embeddings=8192, vocab_size=49152, rotary_base=100000,
    share_embeddings_and_output_weights=True).resolved()}


def _compose(command, overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=command, overrides=list(overrides))


def test_every_yaml_is_covered():
    top = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert top == COMMANDS
    listed = {*(f"model/{m}" for m in MODELS), *(f"data/{d}" for d in DATAS),
              *(f"hydra/launcher/{l}" for l in LAUNCHERS), *(f"recipe/{r}" for r in RECIPES)}
    on_disk = {str(p.relative_to(CONF).with_suffix("")) for p in CONF.glob("*/**/*.yaml")}
    assert on_disk == listed


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("model", MODELS)
def test_models_compose_into_every_command(command, model):
    cfg = OmegaConf.to_object(_compose(command, [f"model={model}"]))
    assert isinstance(cfg, SCHEMAS[command]) and isinstance(cfg.model, ModelConfig)


@pytest.mark.parametrize("data", DATAS)
def test_data_presets_compose(data):
    cfg = OmegaConf.to_object(_compose("train", [f"data={data}"]))
    assert cfg.data.name == data


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_compose_and_search_several_candidates(recipe):
    """Catches a recipe whose search space has no (or a single) candidate on its teacher: the
    search would fail after the teacher's training, or rank nothing."""
    from dataclasses import replace

    from minitron_megatron.model import padded_vocab_size
    from minitron_megatron.search.plan import plan_candidates

    cfg = OmegaConf.to_object(_compose("run", [f"recipe={recipe}"]))
    assert cfg.search.param_budget == 0.5 and cfg.save
    if cfg.teacher.from_gguf:  # the imported teacher's architecture (its GGUF's metadata)
        model = IMPORTED_TEACHERS[cfg.teacher.from_gguf]
        assert parameter_count(model, 49152) == 134_515_008  # the import's count (test_smollm2_recipe.py)
    else:
        model = replace(cfg.model, vocab_size=cfg.data.stdlib_vocab_size).resolved()
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, 1)
    params = parameter_count(model, padded)
    for budget in [cfg.search.param_budget, *cfg.extra_budgets]:
        found = plan_candidates(model, model, params, int(budget * params), cfg.search, padded, 1, 1)
        assert len(found) >= 2, (recipe, budget)
        assert any(c.arch["num_layers"] == model.num_layers for c in found), (recipe, budget)  # width-only
        assert any(c.arch["num_layers"] < model.num_layers for c in found), (recipe, budget)  # depth-pruned
        if cfg.teacher.from_gguf:  # and depth-only
            assert any(c.arch["hidden_size"] == model.hidden_size for c in found), (recipe, budget)


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="stepz"):
        _compose("train", ["train.stepz=3"])


@pytest.mark.parametrize("command", COMMANDS)
def test_seq_length_is_a_run_key_of_every_command(command):
    """Catches a command without the run's sequence length, or one whose default is not null
    (null: the loaded run's, else the model's max_position_embeddings)."""
    assert OmegaConf.to_object(_compose(command)).seq_length is None
    cfg = OmegaConf.to_object(_compose(command, ["seq_length=128", "model.max_position_embeddings=512"]))
    assert (cfg.seq_length, cfg.model.max_position_embeddings, cfg.model_overrides) == (128, 512, [])
    with pytest.raises(Exception, match="seq_length"):
        _compose(command, ["model.seq_length=128"])  # the model has a position limit, not a run length


# Published totals (true vocab, untied), recorded in each preset's header comment.
PUBLISHED = {
    "llama3.1-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "minitron-8b": 8_271_699_968,
    "minitron-4b": 4_190_509_056,
}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_real_family_parameter_counts(model):
    """Catches a wrong preset shape or a wrong count formula (GQA, GLU, biases)."""
    cfg = OmegaConf.to_object(_compose("train", [f"model={model}"])).model
    assert parameter_count(cfg) == PUBLISHED[model]
    validate_model(cfg, ParallelConfig(tp=4, pp=4))  # Qwen2.5-7B: 28 heads in 4 groups, so not TP=8


def _compose_hydra(command, overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=command, overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_config_composes_against_the_plugin_schema(launcher):
    """Catches a misspelt or missing launcher key. Our YAML takes the plugin's place under
    the same name (so Hydra does not check it against the plugin's schema itself): its keys
    must be exactly the schema's, and merging into the schema must type-check."""
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    cfg = _compose_hydra("train", [f"hydra/launcher={launcher}"]).hydra.launcher
    schema = OmegaConf.structured(SlurmQueueConf)
    assert set(cfg) == set(schema)
    merged = OmegaConf.merge(schema, OmegaConf.to_container(cfg))
    assert merged.tasks_per_node == merged.gpus_per_node and merged._target_.endswith("SlurmLauncher")

"""GGUF export: the tiny model and its LoRA adapters run in llama.cpp as they do in transformers."""

import json
import shutil
from io import StringIO

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from django.conf import settings
from django.core.management import CommandError, call_command

from training import services
from llm.finetune.config import FinetuneConfig
from llm.finetune.loop import train
from llm.modeling import load_adapter, load_base
from llm.engine.llamacpp import raw_llama_as_served
from llm import gguf as gguf_export
from llm.gguf import write_lora_gguf, write_model_gguf
from training.models import AdapterVersion, BaseModel, DatasetSnapshot, TrainingRun
from llm.prompting import END, START, Turn, question_text, render_conversation

# Measured: the f32 GGUF and transformers' fp32 agree on every greedy token of these prompts for
# 128 tokens and more. Logits differ by ~1e-5 with an f32 KV cache, by ~5e-3 (logits up to ~5)
# with llama.cpp's default f16 cache.
AGREE_TOKENS = 32
EXACT = 1e-4  # f32 KV cache
CLOSE = 2e-2  # default f16 KV cache


@pytest.fixture(scope="module")
def memorised_adapter(trained_adapter, tmp_path_factory):
    """The session's `trained_adapter` as training leaves it, before any GGUF export: without its adapter.gguf."""
    return shutil.copytree(
        trained_adapter, tmp_path_factory.mktemp("gguf-adapter") / "adapter", ignore=shutil.ignore_patterns("adapter.gguf")
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)


def _llama(model_path, lora_path=None, *, f32_cache=False):
    with raw_llama_as_served():
        return _plain_llama(model_path, lora_path, f32_cache=f32_cache)


def _plain_llama(model_path, lora_path=None, *, f32_cache=False):
    return llama_cpp.Llama(
        model_path=str(model_path),
        lora_path=str(lora_path) if lora_path else None,
        n_ctx=512,
        # One thread: on a busy two-core machine two spinning ggml threads ran a tiny model ~300x slower.
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,  # the tests read every position's logits
        verbose=False,
        # the default f16 KV cache rounds keys and values; f32 shows the weights themselves agree
        **({"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}),
    )


def _llama_greedy(llm, ids, max_new_tokens, stop=None):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == stop:
            break
        llm.eval([token])
    return out


def _hf_greedy(model, ids, max_new_tokens, stop=None):
    out = []
    with torch.no_grad():
        step = model(torch.tensor([ids]), use_cache=True)
        for _ in range(max_new_tokens):
            token = int(step.logits[0, -1].argmax())
            out.append(token)
            if token == stop:
                break
            step = model(torch.tensor([[token]]), cache=step.cache, use_cache=True)
    return out


def _prompt(record):
    return render_conversation([Turn("user", question_text(record["instruction"], record.get("input", "")))])


def _leading_agreement(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------------------------------------
# the tiny model's GGUF


def test_tiny_model_fixture_comes_with_its_gguf_where_describe_checkpoint_finds_it(tiny_model):
    from llm.basemodel import describe_checkpoint

    assert describe_checkpoint(tiny_model)["gguf_path"] == str(tiny_model / "gguf" / "model.gguf")


def test_llama_cpp_tokenises_text_with_turn_markers_exactly_like_the_hf_tokenizer(tiny_model, tokenizer, faq):
    llm = _llama(tiny_model / "gguf" / "model.gguf")
    texts = [
        _prompt(faq[0]),
        render_conversation([Turn("user", "如何退货？ order #A12, 7天内 OK?"), Turn("assistant", "您好！请在 7 天内申请。")]),
        f"{START}user\nHello, world! 123 4567 退款多久到账？{END}\n{START}model\n",
        "  leading spaces,\ttabs\n\nand newlines — 以及全角标点：“引号”。",
        "It's we'll they're I'd 'quoted' ok",
        faq[1]["output"],
    ]
    for text in texts:
        expected = tokenizer(text).input_ids
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == expected, text
        assert expected[0] == tokenizer.bos_token_id
    assert llm.token_bos() == tokenizer.bos_token_id
    assert llm.token_eos() == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(END)


def test_tiny_model_gguf_continues_prompts_greedily_like_transformers_in_fp32(tiny_model, tokenizer, faq):
    model, _ = load_base(tiny_model)
    llm = _llama(tiny_model / "gguf" / "model.gguf")
    exact = _llama(tiny_model / "gguf" / "model.gguf", f32_cache=True)
    prompts = [_prompt(faq[0]), _prompt(faq[3]), "您好！退货流程如下"]
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            hf_logits = model(torch.tensor([ids])).logits[0].numpy()
        for runner, tolerance in ((exact, EXACT), (llm, CLOSE)):
            runner.reset()
            runner.eval(ids)
            assert np.abs(runner.scores[: len(ids)] - hf_logits).max() < tolerance
        # No stop token: the random model's continuation is long enough to compare.
        ours = _llama_greedy(llm, ids, AGREE_TOKENS)
        theirs = _hf_greedy(model, ids, AGREE_TOKENS)
        assert _leading_agreement(ours, theirs) >= AGREE_TOKENS, (prompt, ours, theirs)


def test_write_model_gguf_refuses_an_architecture_it_does_not_convert(tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "m", ignore=shutil.ignore_patterns("gguf"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="gpt_neox"):
        write_model_gguf(tmp_path / "m")
    assert not (tmp_path / "m" / "gguf").exists()


# ---------------------------------------------------------------------------------------------
# LoRA adapters


def test_lora_gguf_holds_llama_cpp_adapter_metadata_and_one_a_b_pair_per_linear_layer(memorised_adapter, tmp_path):
    path = write_lora_gguf(memorised_adapter, tmp_path / "a.gguf")
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "qwen2" and fields["adapter.lora.alpha"] == 32.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 * 7 * 2  # layers × (q, k, v, o, gate, up, down) × (A, B)
    q_a, q_b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    # GGUF lists dimensions innermost first: A is rank × 128 in, B is 128 out × rank
    assert list(q_a.shape) == [128, 16] and list(q_b.shape) == [16, 128]
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert list(tensors["blk.2.ffn_down.weight.lora_a"].shape) == [384, 16]

    half = write_lora_gguf(memorised_adapter, tmp_path / "h.gguf", dtype="f16")
    assert {t.tensor_type for t in gguf.GGUFReader(half).tensors} == {gguf.GGMLQuantizationType.F16}
    assert half.stat().st_size < path.stat().st_size * 0.6


def test_lora_gguf_is_written_beside_the_adapter_by_default_and_replaced_whole(memorised_adapter, tmp_path):
    adapter = shutil.copytree(memorised_adapter, tmp_path / "v1")
    (adapter / "adapter.gguf").write_bytes(b"stale")
    path = write_lora_gguf(adapter)  # base found through base_model_name_or_path
    assert path == adapter / "adapter.gguf"
    assert gguf.GGUFReader(path).fields["general.type"].contents() == "adapter"
    assert sorted(p.name for p in adapter.iterdir() if p.name.startswith(".")) == []  # no partial file left


def test_memorised_adapter_in_llama_cpp_answers_the_trained_questions_as_transformers_peft_does(
    tiny_model, tokenizer, memorised_adapter, faq, tmp_path
):
    lora = write_lora_gguf(memorised_adapter, tmp_path / "adapter.gguf")
    peft_model, _ = load_adapter(tiny_model, memorised_adapter)
    base = _llama(tiny_model / "gguf" / "model.gguf")
    adapted = _llama(tiny_model / "gguf" / "model.gguf", lora)
    stop = tokenizer.eos_token_id
    for record in faq:
        ids = tokenizer(_prompt(record)).input_ids
        expected = _hf_greedy(peft_model, ids, 200, stop)
        assert tokenizer.decode(expected, skip_special_tokens=True).strip() == record["output"]  # memorised
        answer = _llama_greedy(adapted, ids, 200, stop)
        assert answer == expected
        assert _llama_greedy(base, ids, 20, stop) != answer[:20]  # the adapter is what changed it


@pytest.mark.parametrize("variant", ["rslora", "alpha_pattern"])
def test_peft_scalings_other_than_alpha_over_r_give_the_same_update_in_llama_cpp(
    variant, tiny_model, tokenizer, memorised_adapter, faq, tmp_path
):
    """Rewrite the adapter so that PEFT applies the very same update through another scaling."""
    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(memorised_adapter, tmp_path / variant)
    config = json.loads((adapter / "adapter_config.json").read_text())
    if variant == "rslora":
        config.update(use_rslora=True, lora_alpha=32 / 16 * 16**0.5)  # alpha / sqrt(r) = 2, as alpha / r was
    else:
        config["alpha_pattern"] = {"q_proj": 64}  # twice the scale on q_proj, so its B is halved
        weights = load_file(adapter / "adapter_model.safetensors")
        weights = {k: v / 2 if "q_proj.lora_B" in k else v for k, v in weights.items()}
        save_file(weights, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    lora = write_lora_gguf(adapter, base_dir=tiny_model)
    peft_model, _ = load_adapter(tiny_model, adapter)
    adapted = _llama(tiny_model / "gguf" / "model.gguf", lora, f32_cache=True)
    ids = tokenizer(_prompt(faq[0])).input_ids
    with torch.no_grad():
        peft_logits = peft_model(torch.tensor([ids])).logits[0].numpy()
    adapted.reset()
    adapted.eval(ids)
    assert np.abs(adapted.scores[: len(ids)] - peft_logits).max() < EXACT
    assert tokenizer.decode(_llama_greedy(adapted, ids, 200, tokenizer.eos_token_id), skip_special_tokens=True).strip() == faq[0]["output"]


def test_llama_architecture_lora_is_permuted_as_llama_cpp_wants(tiny_model, tokenizer, tmp_path):
    """A tiny random Llama with a random LoRA (llama.cpp reorders q/k rows for this architecture)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir = tmp_path / "llama"
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model_gguf = write_model_gguf(base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    lora = write_lora_gguf(tmp_path / "adapter", base_dir=base_dir)
    assert gguf.GGUFReader(lora).fields["general.architecture"].contents() == "llama"

    ids = tokenizer("您好！退货流程如下").input_ids
    with torch.no_grad():
        peft_logits = peft_model(torch.tensor([ids])).logits[0].numpy()
        with peft_model.disable_adapter():
            base_logits = peft_model(torch.tensor([ids])).logits[0].numpy()
    for lora_path, expected in ((None, base_logits), (lora, peft_logits)):
        llm = _llama(model_gguf, lora_path, f32_cache=True)
        llm.eval(ids)
        assert np.abs(llm.scores[: len(ids)] - expected).max() < EXACT
    assert np.abs(peft_logits - base_logits).max() > 0.1  # the random LoRA does change the output


def _adapter_copy(memorised_adapter, tmp_path, *, config=None, extra_tensors=None):
    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(memorised_adapter, tmp_path / "edited")
    if config:
        merged = {**json.loads((adapter / "adapter_config.json").read_text()), **config}
        (adapter / "adapter_config.json").write_text(json.dumps(merged))
    if extra_tensors:
        save_file({**load_file(adapter / "adapter_model.safetensors"), **extra_tensors}, adapter / "adapter_model.safetensors")
    return adapter


@pytest.mark.parametrize(
    "config, extra, message",
    [
        ({"use_dora": True}, None, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"bias": "lora_only"}, None, "bias"),
        ({"peft_type": "IA3"}, None, "IA3"),
        (None, {"base_model.model.lm_head.lora_A.weight": torch.zeros(16, 128), "base_model.model.lm_head.lora_B.weight": torch.zeros(2048, 16)}, "lm_head"),
        (None, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(16, 2048), "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(128, 16)}, "embed_tokens"),
        (None, {"base_model.model.lm_head.weight": torch.zeros(2048, 128)}, "lm_head.weight"),
    ],
    ids=["dora", "modules-to-save", "bias", "not-lora", "lm-head-lora", "embedding-lora", "full-module"],
)
def test_lora_export_refuses_what_llama_cpp_cannot_apply_naming_it(memorised_adapter, tmp_path, tiny_model, config, extra, message):
    adapter = _adapter_copy(memorised_adapter, tmp_path, config=config, extra_tensors=extra)
    with pytest.raises(ValueError, match=message):
        write_lora_gguf(adapter, base_dir=tiny_model)
    assert not (adapter / "adapter.gguf").exists()


def test_lora_export_refuses_an_unknown_base_architecture_and_a_lost_base(memorised_adapter, tmp_path, tiny_model):
    other = shutil.copytree(tiny_model, tmp_path / "neox", ignore=shutil.ignore_patterns("gguf", "*.safetensors"))
    (other / "config.json").write_text(json.dumps({**json.loads((other / "config.json").read_text()), "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="'gpt_neox'.*gemma3_text, llama, qwen2"):
        write_lora_gguf(memorised_adapter, tmp_path / "x.gguf", base_dir=other)
    moved = _adapter_copy(memorised_adapter, tmp_path, config={"base_model_name_or_path": str(tmp_path / "gone")})
    with pytest.raises(FileNotFoundError, match="pass base_dir"):
        write_lora_gguf(moved)


# ---------------------------------------------------------------------------------------------
# the training run and the command


def _sample_pairs(train=4, dev=1):
    from knowledge.models import QAPair

    records = json.loads(settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))[: train + dev]
    for index, record in enumerate(records):
        QAPair.objects.create(
            instruction=record["instruction"], output=record["output"], status="approved", split="train" if index < train else "dev"
        )


@pytest.mark.django_db
def test_a_training_run_leaves_the_llama_cpp_lora_in_the_version_folder(training_env, settings):
    from training.tasks import run_training

    settings.CSP_TRAINING_DEVICE = "cpu"
    settings.CSP_HEARTBEAT_SECONDS = 3600  # no heartbeat writes from a second connection to the test database
    settings.CSP_EVAL_MAX_NEW_TOKENS = 8
    _sample_pairs()
    run = services.training_run_start(hyperparameters={"epochs": 1}, enqueue=False)
    assert run_training(run.pk) == "v1"
    version = AdapterVersion.objects.get()
    reader = gguf.GGUFReader(f"{version.path}/adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter" and len(reader.tensors) == 42
    run.refresh_from_db()
    assert "llama.cpp LoRA written: adapter.gguf" in run.log


@pytest.mark.django_db
def test_a_failed_gguf_export_is_logged_and_the_run_still_succeeds(training_env, settings, monkeypatch):
    from training.tasks import run_training

    settings.CSP_TRAINING_DEVICE = "cpu"
    settings.CSP_HEARTBEAT_SECONDS = 3600
    settings.CSP_EVAL_MAX_NEW_TOKENS = 8

    def broken(*args, **kwargs):
        raise ValueError("cannot convert this adapter")

    monkeypatch.setattr(gguf_export, "write_lora_gguf", broken)
    _sample_pairs()
    run = services.training_run_start(hyperparameters={"epochs": 1}, enqueue=False)
    assert run_training(run.pk) == "v1"
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED
    assert "GGUF export failed, this version has no llama.cpp LoRA file: ValueError: cannot convert this adapter" in run.log
    version = AdapterVersion.objects.get()
    assert not (services.adapters_root() / version.name / "adapter.gguf").exists()
    assert (services.adapters_root() / version.name / "adapter_model.safetensors").is_file()


def _versions(tmp_path, tiny_model, memorised_adapter, names):
    base = BaseModel.objects.create(name="tiny", path=str(tiny_model))
    snapshot = DatasetSnapshot.objects.create(sha256="0" * 64, path="/x", train_count=4, dev_count=0)
    versions = []
    for name in names:
        run = TrainingRun.objects.create(base_model=base, snapshot=snapshot, status="succeeded")
        folder = shutil.copytree(memorised_adapter, tmp_path / name)
        versions.append(AdapterVersion.objects.create(name=name, run=run, base_model=base, path=str(folder)))
    return versions


def _command(*args):
    out, err = StringIO(), StringIO()
    call_command("export_gguf_adapters", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_export_command_writes_missing_files_skips_existing_ones_and_rewrites_with_force(tmp_path, tiny_model, memorised_adapter):
    _versions(tmp_path, tiny_model, memorised_adapter, ["v1", "v2"])
    existing = tmp_path / "v2" / "adapter.gguf"
    existing.write_bytes(b"kept as it is")

    out, _ = _command()
    assert f"v1: wrote {tmp_path / 'v1' / 'adapter.gguf'}" in out and "v2: " in out and "skipped" in out
    assert gguf.GGUFReader(tmp_path / "v1" / "adapter.gguf").fields["adapter.type"].contents() == "lora"
    assert existing.read_bytes() == b"kept as it is"

    first = (tmp_path / "v1" / "adapter.gguf").read_bytes()
    out, _ = _command()  # idempotent
    assert out.count("skipped") == 2 and (tmp_path / "v1" / "adapter.gguf").read_bytes() == first

    out, _ = _command("--force", "v2")
    assert out.startswith("v2: wrote") and "v1" not in out
    assert gguf.GGUFReader(existing).fields["general.type"].contents() == "adapter"


@pytest.mark.django_db
def test_export_command_reports_a_version_it_cannot_export_and_an_unknown_name(tmp_path, tiny_model, memorised_adapter):
    _versions(tmp_path, tiny_model, memorised_adapter, ["v1", "v2"])
    config = tmp_path / "v1" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": True}))
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError, match="1 adapter version"):
        call_command("export_gguf_adapters", stdout=out, stderr=err)
    assert "v1: failed:" in err.getvalue() and "DoRA" in err.getvalue()
    assert (tmp_path / "v2" / "adapter.gguf").is_file()  # the others are still exported
    with pytest.raises(CommandError, match="No adapter version named v9"):
        _command("v2", "v9")


# ---------------------------------------------------------------------------------------------
# the real base model


@pytest.mark.slow
def test_a_gemma_lora_on_the_q4_k_m_gguf_continues_as_transformers_peft_does_on_the_safetensors(tmp_path):
    """The embedded base: the GGUF's values are the safetensors' (dequantised from it), so the
    f32 LoRA on the Q4_K_M file follows transformers + peft (measured: 60 of 60 greedy tokens on
    four prompts; an f16 LoRA parted after 3 and 14 tokens on two of them)."""
    from transformers import AutoTokenizer

    from llm.basemodel import describe_checkpoint

    base = settings.DATA_DIR / "models" / "gemma-3-270m"
    gguf_path = describe_checkpoint(base)["gguf_path"]
    records = json.loads(settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))[:4]
    config = FinetuneConfig(lora_r=8, lora_alpha=32, lora_dropout=0.0, epochs=8, batch_size=4, max_length=160, learning_rate=2e-3)
    train(config, base, records, [], tmp_path / "run")
    lora = write_lora_gguf(tmp_path / "run" / "adapter", base_dir=base)
    reader = gguf.GGUFReader(lora)
    assert reader.fields["general.architecture"].contents() == "gemma3" and len(reader.tensors) == 18 * 7 * 2

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model, _ = load_adapter(base, tmp_path / "run" / "adapter")
    plain, adapted = _llama(gguf_path), _llama(gguf_path, lora)
    stop = tokenizer.convert_tokens_to_ids(END)
    for record in records[:2]:
        prompt = _prompt(record)
        ids = tokenizer(prompt).input_ids
        assert plain.tokenize(prompt.encode("utf-8"), add_bos=True, special=True) == ids
        with torch.no_grad():
            output = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=stop)
        expected = output[0, len(ids) :].tolist()
        answer = _llama_greedy(adapted, ids, 40, stop)
        assert _leading_agreement(answer, expected) >= 32
        assert _llama_greedy(plain, ids, 40, stop) != answer

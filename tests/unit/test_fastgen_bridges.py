"""The project's bridges over DeepSpeed-FastGen 0.19.8's measured defects (handlers/fastgen_model.py) and
the start-up correctness gate (handlers/correctness_gate.py), on a CPU. The CUDA kernels they steer are
tested on the GPU (tests/gpu/test_gpu_fastgen.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, PhiConfig

from handlers.correctness_gate import FILLER_PROMPT, TAIL, hf_references, probe_lengths, probe_tokens, run_gate
from handlers.fastgen_model import (
    FastGenUnsupported,
    attention_atoms,
    _set_epsilon,
    _with_inv_freqs,
    bridged_model_class,
    bridged_policy_class,
    bridges_for,
    norm_epsilon,
    rotary_inverse_frequencies,
)
from tests.support.ragged_engine import ReferenceRaggedEngine

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def test_llama_frequencies_are_fp32_and_match_the_rope_formula():
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 10000.0})
    freqs = rotary_inverse_frequencies(config)
    dim = 128
    expected = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    assert freqs.dtype == torch.float32 and freqs.shape == (64,)
    torch.testing.assert_close(freqs, expected)
    # what DeepSpeed's own kernel uses instead: each frequency rounded to fp16 (the defect being bridged)
    assert (freqs.half().float() - freqs).abs().max() > 1e-5


def test_llama3_rope_scaling_matches_deepspeeds_independent_llama3_formula():
    """Llama 3.1+ (rope_type llama3), which v2's Llama refuses: our frequencies (HF's) against the llama3
    formula DeepSpeed itself implements for EXAONE 4.5 (model_implementations/exaone4_5/model.py)."""
    from deepspeed.inference.v2.model_implementations.exaone4_5.model import _llama3_inverse_frequencies

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters=dict(LLAMA3_ROPE))
    ours = rotary_inverse_frequencies(config)
    theirs = _llama3_inverse_frequencies(config, torch.device("cpu")).float()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    plain = rotary_inverse_frequencies(LlamaConfig(hidden_size=4096, num_attention_heads=32,
                                                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert not torch.allclose(ours, plain)  # the scaling is really applied (low frequencies divided by 8)


def test_partial_rotary_gives_half_the_rotary_dimension():
    config = PhiConfig(hidden_size=256, num_attention_heads=4, partial_rotary_factor=0.5)  # head 64, rotary 32
    assert rotary_inverse_frequencies(config).shape == (16,)


@pytest.mark.parametrize("rope, words", [
    ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "changes the rotary frequencies"),
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 2048},
     "scales attention"),
])
def test_rotary_variants_one_tensor_cannot_express_are_refused_by_name(rope, words):
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=8192, rope_parameters=rope)
    with pytest.raises(FastGenUnsupported, match=words) as error:
        rotary_inverse_frequencies(config)
    assert rope["rope_type"] in str(error.value)


def test_models_without_rotary_and_unknown_types():
    assert rotary_inverse_frequencies(OPTConfig()) is None
    assert bridges_for(OPTConfig()).inv_freqs is None
    with pytest.raises(FastGenUnsupported, match="gpt2"):
        from transformers import GPT2Config
        bridges_for(GPT2Config())


def test_norm_epsilon_is_read_from_each_familys_key():
    assert norm_epsilon(LlamaConfig(rms_norm_eps=1e-6)) == 1e-6
    assert norm_epsilon(PhiConfig(layer_norm_eps=1e-5)) == 1e-5
    assert norm_epsilon(OPTConfig()) is None  # OPT's config has no eps: DeepSpeed's 1e-5 is OPT's own


def test_bridged_llama_asks_deepspeed_for_the_trained_rotary_kernel():
    from deepspeed.inference.v2.model_implementations import Llama2Policy
    from deepspeed.inference.v2.model_implementations.llama_v2.model import Llama2InferenceModel
    from deepspeed.inference.v2.modules.configs import RotateHalfConfig

    bridges = bridges_for(LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=dict(LLAMA3_ROPE),
                                      max_position_embeddings=131072))
    model_cls = bridged_model_class("llama", bridges)
    assert issubclass(model_cls, Llama2InferenceModel)
    # DeepSpeed builds its attention from this property (make_attn_layer); v2's own Llama refuses llama3 here
    config = model_cls.positional_embedding_config.fget(object.__new__(model_cls))
    assert isinstance(config, RotateHalfConfig) and config.use_trained_freqs
    assert issubclass(bridged_policy_class("llama", bridges), Llama2Policy)


def test_attention_wrapper_passes_fp32_frequencies_and_keeps_the_modules_interface():
    calls = []

    class Attention(torch.nn.Module):
        kv_block_size = 64

        def forward(self, q_k_v, kv_cache, batch, inv_freqs=None):
            calls.append(inv_freqs)
            return q_k_v

        def build_atoms(self, batch):
            return "atoms"

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

    model = Model()
    freqs = torch.rand(8)
    model.attn = _with_inv_freqs(model.attn, freqs)  # an nn.Module attribute: must be a Module itself
    assert model.attn(torch.ones(2), None, None).tolist() == [1.0, 1.0]
    assert calls[0] is model.attn.inv_freqs and calls[0].dtype == torch.float32
    assert model.attn.kv_block_size == 64 and model.attn.build_atoms(None) == "atoms"


def test_epsilon_is_set_on_every_kernel_the_norm_module_holds():
    class Kernel:
        def __init__(self):
            self.epsilon = 1e-5

    class Norm:
        def __init__(self):
            self._fp_rms, self._fp_rms_pre, self.channels = Kernel(), Kernel(), 4096

    norm = Norm()
    _set_epsilon(norm, 1e-6)
    assert norm._fp_rms.epsilon == 1e-6 and norm._fp_rms_pre.epsilon == 1e-6 and norm.channels == 4096


# ---- the correctness gate -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    # initializer_range 0.1 (HF's default is 0.02): attention scores large enough that positions matter,
    # as in trained models; with 0.02 random attention is nearly uniform and hides any rotary error.
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, initializer_range=0.1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlamaForCausalLM(config).eval()


def gate(model, engine_model, *, max_atoms=None, max_sequences=4, max_prefill_tokens=1024):
    """The gate with HF references of `model` (fp32, fp16) and `engine_model` run in fp16 as the engine, the
    stand-in's attention-atom buffer holding `max_atoms` (None: unbounded)."""
    import copy

    probes = [probe_tokens(128, n) for n in (48, 600)]
    references = hf_references(lambda dtype: copy.deepcopy(model).to(dtype), probes, torch.float16,
                               torch.device("cpu"))
    engine_half = copy.deepcopy(engine_model).half()
    rotary = engine_half.model.rotary_emb  # its frequencies as `engine_model` has them, in fp32 (as bridged)
    rotary.inv_freq = rotary.original_inv_freq = engine_model.model.rotary_emb.inv_freq.float().clone()
    ragged = ReferenceRaggedEngine(engine_half, num_blocks=64, max_tokens_per_put=max_prefill_tokens + max_sequences,
                                   max_sequences=max_sequences, max_atoms=max_atoms)

    def forward(sequences, tokens):
        return ragged.put(sequences, [torch.tensor(t) for t in tokens], do_checks=False).float()

    result = run_gate(references, forward, ragged.flush, max_sequences=max_sequences,
                      max_prefill_tokens=max_prefill_tokens, vocab_size=128)
    return result, ragged


def test_the_gate_passes_an_engine_that_computes_what_hf_computes(llama):
    result, ragged = gate(llama, llama)
    assert result.passed, result.describe()
    assert [p.key for p in result.probes] == ["48", "600", "48@batch4", "600@batch4"]
    assert all(p.argmax_agreement >= 0.9 for p in result.probes), result.describe()
    # alone: the prefix in one step, then TAIL - 1 teacher-forced steps of one token
    assert ragged.puts[0] == ([0], [48 - TAIL]) and ragged.puts[1:TAIL] == [([0], [1])] * (TAIL - 1)
    # in the batch, the two free slots hold fillers (admitted first, prefilled first), which then decode ahead
    # of the probes in every step, as running requests do; the first probe step is the widest a step gets
    first = next(index for index, (uids, _) in enumerate(ragged.puts) if uids[:2] == [2, 3] and len(uids) == 4)
    assert ragged.puts[first - 1] == ([2, 3], [FILLER_PROMPT, FILLER_PROMPT])
    assert ragged.puts[first] == ([2, 3, 0, 1], [1, 1, 48 - TAIL, 600 - TAIL])
    assert ragged.seen == {}  # every sequence released


def test_the_gate_chunks_prompts_with_the_servers_prefill_budget(llama):
    result, ragged = gate(llama, llama, max_prefill_tokens=256)
    assert result.passed, result.describe()
    assert max(sum(sizes) for _, sizes in ragged.puts) <= 256 + 4
    assert ([0], [256]) in ragged.puts and ([0], [600 - TAIL - 512]) in ragged.puts  # 584 = 256 + 256 + 72


def test_the_gate_fails_an_attention_atom_buffer_sized_by_sequences(llama):
    """DeepSpeed 0.19.8's defect (its buffer holds max_ragged_sequence_count atoms; a put needs one per 128
    new tokens of each sequence), reproduced by the stand-in: with room for as many atoms as sequences, the
    600-token probe's 584-token prefix (5 atoms) loses attention, and the gate fails; with the room
    `attention_atoms` gives, it passes and no put needed more."""
    result, _ = gate(llama, llama, max_atoms=4)
    assert not result.passed
    assert {p.key for p in result.probes if p.ratio > result.tolerance} >= {"600", "600@batch4"}, result.describe()
    room = attention_atoms(4, 1024, 128)
    result, ragged = gate(llama, llama, max_atoms=room)
    assert result.passed, result.describe()
    assert max(ragged.atoms) <= room


def test_the_gate_fails_deepspeeds_fp16_rounded_rotary_frequencies(llama):
    """DeepSpeed 0.19.8's defect, reproduced on the CPU: the same weights with each inverse frequency
    rounded to fp16 before it multiplies the position. The error grows with position, so the long probe
    fails the gate."""
    import copy

    rounded = copy.deepcopy(llama)
    rotary = rounded.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.half().float()
    rotary.original_inv_freq = rotary.inv_freq
    result, _ = gate(llama, rounded)
    assert not result.passed
    short, long = result.probes[:2]
    assert long.ratio > result.tolerance and long.ratio > 3 * short.ratio
    assert "FAILED" in result.describe() and "600 positions alone" in result.describe()


def test_probes_are_seeded_random_ids_from_the_whole_vocabulary():
    probe = probe_tokens(49152, 2000)
    assert probe == probe_tokens(49152, 2000) and len(probe) == 2000
    assert len(set(probe)) > 1900 and max(probe) > 45000  # no period for a position error to hide in
    assert probe_lengths(8192) == [48, 600, 2000] and probe_lengths(1000) == [48, 600, 1000]
    assert probe_lengths(16) == []


def test_shapes_deepspeeds_kernels_cannot_take_are_refused_by_name():
    from transformers import FalconConfig

    # Falcon-7B: 71 query heads share one KV head; the fp32-frequency rotary kernel takes ratios up to 8
    falcon7b = FalconConfig(hidden_size=4544, num_attention_heads=71, multi_query=True, new_decoder_architecture=False)
    with pytest.raises(FastGenUnsupported, match="71 query heads per KV head.*BlockedTrainedRotaryEmbeddings"):
        bridges_for(falcon7b)
    with pytest.raises(FastGenUnsupported, match=r"head size 32: .*\[64, 80, 96, 128\]"):
        bridges_for(LlamaConfig(hidden_size=256, num_attention_heads=8))
    llama2_7b = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32)
    assert bridges_for(llama2_7b).inv_freqs.shape == (64,)


def test_preflight_refuses_what_deepspeeds_attention_would_serve_wrongly():
    from transformers import MistralConfig

    from handlers.fastgen_model import preflight

    mistral_v01 = MistralConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, sliding_window=4096,
                                max_position_embeddings=32768)
    with pytest.raises(FastGenUnsupported, match="sliding_window=4096 is shorter than max_tokens=8192"):
        preflight(mistral_v01, 8192)
    assert preflight(mistral_v01, 4096).inv_freqs is not None  # the window covers every position served
    with pytest.raises(FastGenUnsupported, match="OPT-350m"):
        preflight(OPTConfig(do_layer_norm_before=False), 2048)


def test_gate_references_run_where_fp32_weights_fit_or_the_gate_is_skipped_with_a_warning(tmp_path, monkeypatch,
                                                                                          caplog):
    """GPU memory too small for the fp32 reference: it loads straight onto the CPU (device_map) and runs there;
    neither large enough: no references, and a warning says the gate is skipped."""
    from transformers import AutoModelForCausalLM

    from handlers import correctness_gate

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=1, max_position_embeddings=128)).save_pretrained(tmp_path)
    probes = [list(range(40))]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 80 * 2**30))  # a full GPU
    references = correctness_gate.checkpoint_references(str(tmp_path), False, torch.float16, torch.device("cuda"),
                                                        probes, AutoModelForCausalLM)
    assert len(references) == 1 and references[0].fp32.shape == (TAIL, 128)
    assert references[0].half.dtype == torch.float32  # logits compared in fp32, computed by the fp16 model
    assert not torch.equal(references[0].fp32, references[0].half)
    monkeypatch.setattr(correctness_gate, "_host_available_bytes", lambda: 1024)
    with caplog.at_level("WARNING"):
        assert correctness_gate.checkpoint_references(str(tmp_path), False, torch.float16, torch.device("cuda"),
                                                      probes, AutoModelForCausalLM) is None
    assert "correctness gate skipped" in caplog.text

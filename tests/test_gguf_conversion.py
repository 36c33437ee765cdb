"""The causal-LM job's GGUF conversion (fastmezo.apps.causal_lm.resolve_causal / gguf_to_folder), on a
tiny Llama written to a GGUF file here with the ``gguf`` package, the way llama.cpp's converter lays
it out (tensor names, q/k rows permuted for its rotary layout, a byte-level BPE tokenizer). Weights are
stored as float32, so the conversion must give back the source model exactly: every tensor and the
logits are compared bit for bit (torch.equal), not within a tolerance.
"""
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from fastmezo.apps import causal_lm  # noqa: E402

HEADS, KV_HEADS = 4, 2


def _byte_tokens():
    """GPT-2's byte-level alphabet (each byte as a printable character), as its tokenizers write it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _llamacpp_permute(w, n_head):
    """llama.cpp's reordering of a q or k projection's rows (undone by transformers when reading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model, path):
    cfg = model.config
    tokens = ["<|endoftext|>", *_byte_tokens(), "Ġt", "Ġth", "Ġthe"]
    merges = ["Ġ t", "Ġt h", "Ġth e"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))  # 3: control (the special token), 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _llamacpp_permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _llamacpp_permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    # No output.weight: the reader then ties the LM head to the embeddings, as SmolLM2's file does.
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


@pytest.fixture(scope="module")
def source():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # norms away from their init of ones, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_conversion_gives_back_the_source_model_exactly(source, tmp_path, monkeypatch):
    monkeypatch.setenv(causal_lm.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "tiny-llama.gguf"
    _write_gguf(source, path)
    folder = causal_lm.resolve_causal(path)                      # the job's path: converted into the cache
    assert folder.parent == tmp_path / "cache" and (folder / "config.json").is_file()
    model, tokenizer = causal_lm.load_causal_lm(path)           # reuses the cached folder
    assert causal_lm.resolve_causal(path) == folder
    got, want = model.state_dict(), source.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name]), name
    # A permutation bug in q/k would keep every tensor's set of values but change the logits: compare them.
    ids = torch.tensor([[5, 77, 3, 200, 259, 17, 42, 9]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, source(input_ids=ids).logits)
    # The tokenizer came across: byte-level BPE with the merges written above.
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the", add_special_tokens=False)["input_ids"]) == ["Ġthe"]
    assert tokenizer.decode(tokenizer("hi the end", add_special_tokens=False)["input_ids"]) == "hi the end"


def test_a_wrong_permutation_would_be_caught(source):
    """The q/k check above can fail: the permutation changes a projection (rows move) and its inverse is
    what the reader applies, so skipping it on writing would change the converted weights."""
    q = source.model.layers[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(_llamacpp_permute(q, HEADS), q)

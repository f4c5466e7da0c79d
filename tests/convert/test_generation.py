"""generate() with the LUCID cache (K, normalised K, V') and left-padded batches."""

import torch
from transformers import AutoModelForCausalLM


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


def test_greedy_generate_with_cache_equals_recomputation(exported):
    model = _model(exported)
    prompt = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, output_logits=True,
                             output_hidden_states=True, return_dict_in_generate=True, pad_token_id=258,
                             eos_token_id=None)
        ids = prompt
        for step in range(12):  # recompute everything from scratch at every step, no cache
            logits = model(ids, use_cache=False, float32_logits=True).logits[:, -1]
            assert (logits - out.logits[step]).abs().max().item() < 1e-5
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            # hidden states reach generate(): the prompt's at the first step, then the new token's
            states = out.hidden_states[step]
            assert len(states) == 3 and states[-1].shape == (1, 21 if step == 0 else 1, 64)
            assert torch.equal(model.lm_head(states[-1][:, -1]), out.logits[step])
    assert torch.equal(out.sequences, ids)


def test_chunked_prefill_and_decode_equal_one_pass(exported):
    model = _model(exported)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :17], use_cache=True)
        second = model(ids[:, 17:30], cache=first.cache, attention_mask=torch.ones(2, 30, dtype=torch.long))
        rest = [model(ids[:, t : t + 1], cache=second.cache, attention_mask=torch.ones(2, t + 1, dtype=torch.long))
                for t in range(30, 40)]
    pieces = torch.cat([first.logits, second.logits, *[r.logits for r in rest]], dim=1)
    assert (pieces - full).abs().max().item() < 1e-5


def test_left_padded_batch_gives_each_row_its_own_tokens(exported):
    model = _model(exported)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (9, 16, 4)]
    width = max(len(p) for p in prompts)
    batch = torch.full((3, width), 258)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        batch[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=258,
                                  eos_token_id=None)
        for r, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=8, do_sample=False, pad_token_id=258, eos_token_id=None)
            assert torch.equal(together[r, width:], alone[0, len(p):]), r
        # and the padded prefill's logits equal each row's own, at the real tokens
        padded = model(batch, attention_mask=mask, use_cache=False).logits
        for r, p in enumerate(prompts):
            own = model(p[None], use_cache=False).logits[0]
            assert (padded[r, width - len(p):] - own).abs().max().item() < 1e-5


def test_only_left_padding_is_accepted(exported):
    model = _model(exported)
    ids = torch.randint(0, 256, (1, 6))
    import pytest

    with pytest.raises(ValueError, match="only left padding is supported"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1]]))

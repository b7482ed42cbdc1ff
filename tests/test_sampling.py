"""Every llama.cpp sampler, with its parameters, shows its effect on the real model.

Each test compares against the same request without the sampler (or with another seed),
so it shows what the sampler does, not merely that it is accepted.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import jsonschema
import pytest

from llama_crab import Llama
from llama_crab_client.errors import InvalidArgumentError
from llama_crab_client.sampling import Custom, Dry, Greedy, SamplerChain, TopK
from llama_crab_client.types import CompletionOptions, StopReason

PROMPT = "Once upon a time, in a small village by the sea,"
# Repetition-prone: the model keeps continuing the pattern verbatim.
REPETITIVE = "apple banana cherry apple banana cherry apple banana cherry apple banana cherry apple"


def ids(llama: Llama, prompt: str, options: CompletionOptions) -> list[int]:
    return list(llama.create_completion(prompt, options).token_ids)


def repeated_ngrams(tokens: list[int], n: int = 3) -> int:
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return sum(c - 1 for c in counts.values() if c > 1)


def eos_id(llama: Llama) -> int:
    return llama.tokenize("<|endoftext|>", add_special=False, parse_special=True)[0]


# ---- one field list: the flat options and the typed chain are the same samplers ----------
def test_typed_chain_equals_the_same_named_chain(llama: Llama) -> None:
    named = CompletionOptions(24, temperature=0.9, top_k=30, top_p=0.9, min_p=0.02, seed=11).with_samplers(
        ["top_k", "top_p", "min_p", "temperature"]
    )
    typed = CompletionOptions(24, seed=11).with_sampler_chain(SamplerChain().top_k(30).top_p(0.9).min_p(0.02).temp(0.9).dist())
    assert ids(llama, PROMPT, named) == ids(llama, PROMPT, typed)


@pytest.mark.parametrize(
    "chain",
    [
        SamplerChain().top_k(1).dist(),
        SamplerChain().top_p(0.0).dist(),
        SamplerChain().min_p(1.0).dist(),
        SamplerChain().top_n_sigma(1e-6).dist(),
        SamplerChain().temp(0.0).dist(),
        SamplerChain().greedy(),
    ],
    ids=["top_k=1", "top_p=0", "min_p=1", "top_n_sigma~0", "temp=0", "greedy"],
)
def test_truncation_to_one_token_is_greedy(llama: Llama, chain: SamplerChain) -> None:
    greedy = ids(llama, PROMPT, CompletionOptions(24))
    for seed in (1, 2):
        assert ids(llama, PROMPT, CompletionOptions(24, seed=seed, sampler_chain=chain)) == greedy


def test_dist_is_seeded(llama: Llama) -> None:
    chain = SamplerChain().temp(1.0).dist()
    a = ids(llama, PROMPT, CompletionOptions(32, seed=5, sampler_chain=chain))
    assert a == ids(llama, PROMPT, CompletionOptions(32, seed=5, sampler_chain=chain))
    assert a != ids(llama, PROMPT, CompletionOptions(32, seed=6, sampler_chain=chain))


def test_typical_with_a_tiny_mass_keeps_one_token(llama: Llama) -> None:
    # Plain sampling differs between seeds; typical with p ~ 0 leaves one candidate per step.
    plain = [ids(llama, PROMPT, CompletionOptions(24, seed=s, sampler_chain=SamplerChain().temp(1.5).dist())) for s in (1, 2)]
    assert plain[0] != plain[1]
    chain = SamplerChain().typical(1e-6).temp(1.5).dist()
    typical = [ids(llama, PROMPT, CompletionOptions(24, seed=s, sampler_chain=chain)) for s in (1, 2)]
    assert typical[0] == typical[1]


def test_dynamic_temperature(llama: Llama) -> None:
    # Range 0 is the plain temperature; a range changes what a seed draws.
    fixed = ids(llama, PROMPT, CompletionOptions(32, seed=3, sampler_chain=SamplerChain().temp(1.0).dist()))
    zero_range = ids(llama, PROMPT, CompletionOptions(32, seed=3, sampler_chain=SamplerChain().dynamic_temp(1.0, 0.0).dist()))
    assert zero_range == fixed
    ranged = CompletionOptions(32, seed=3, temperature=1.0).with_dynamic_temperature(0.9, 1.0)
    assert ids(llama, PROMPT, ranged) != fixed


@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_is_deterministic_with_a_seed_and_differs_from_plain_sampling(llama: Llama, mode: int) -> None:
    options = CompletionOptions(40, temperature=1.0, seed=7).with_mirostat(mode, tau=3.0, eta=0.1)
    first = ids(llama, PROMPT, options)
    assert first == ids(llama, PROMPT, options)
    plain = ids(llama, PROMPT, CompletionOptions(40, temperature=1.0, seed=7))
    assert first != plain
    # The typed stage does the same as the flat option.
    stage = SamplerChain().temp(1.0).mirostat(3.0, 0.1) if mode == 1 else SamplerChain().temp(1.0).mirostat_v2(3.0, 0.1)
    assert ids(llama, PROMPT, CompletionOptions(40, seed=7, sampler_chain=stage)) == first


def test_mirostat_low_surprise_target_is_more_predictable(llama: Llama) -> None:
    # tau is the target surprise (-log2 p): a low target keeps picks near the top.
    def mean_logprob(tau: float) -> float:
        done = llama.create_completion(PROMPT, CompletionOptions(48, temperature=1.0, seed=9, logprobs=0).with_mirostat(2, tau))
        assert done.logprobs
        return sum(lp.logprob for lp in done.logprobs) / len(done.logprobs)

    assert mean_logprob(0.5) > mean_logprob(8.0)


def test_dry_reduces_verbatim_repeats(llama: Llama) -> None:
    base = CompletionOptions(48, temperature=0.7, seed=4)
    without = ids(llama, REPETITIVE, base)
    with_dry = ids(llama, REPETITIVE, base.with_dry(2.0, base=1.75, allowed_length=2, penalty_last_n=-1))
    assert repeated_ngrams(without) > 0
    assert repeated_ngrams(with_dry) < repeated_ngrams(without)
    # Greedy too: DRY changes the logits before the argmax.
    greedy = ids(llama, REPETITIVE, CompletionOptions(48))
    greedy_dry = ids(llama, REPETITIVE, CompletionOptions(48).with_dry(2.0, penalty_last_n=-1))
    assert repeated_ngrams(greedy_dry) < repeated_ngrams(greedy)


def test_dry_sequence_breakers_matter(llama: Llama) -> None:
    # With " " as a breaker, no repeat spans a word boundary, so DRY barely acts.
    dry = SamplerChain().dry(2.0, allowed_length=1, last_n=-1)
    broken = SamplerChain().dry(2.0, allowed_length=1, last_n=-1, sequence_breakers=[" ", "apple", "banana"])
    a = ids(llama, REPETITIVE, CompletionOptions(32, sampler_chain=dry.greedy()))
    b = ids(llama, REPETITIVE, CompletionOptions(32, sampler_chain=broken.greedy()))
    assert a != b


def test_penalties_stage_reduces_repeats(llama: Llama) -> None:
    plain = ids(llama, REPETITIVE, CompletionOptions(48))
    penalised = ids(llama, REPETITIVE, CompletionOptions(48, sampler_chain=SamplerChain().penalties(last_n=-1, repeat=1.5).greedy()))
    assert repeated_ngrams(penalised) < repeated_ngrams(plain)


def test_xtc_never_emits_the_top_token_when_another_is_above_the_threshold(llama: Llama) -> None:
    threshold = 0.1
    chain = SamplerChain().xtc(probability=1.0, threshold=threshold).dist()
    done = llama.create_completion(PROMPT, CompletionOptions(48, seed=1, logprobs=5, sampler_chain=chain))
    assert done.logprobs
    contested = 0
    for lp in done.logprobs:
        above = [t for t in lp.top if math.exp(t.logprob) >= threshold]
        if len(above) >= 2:
            contested += 1
            assert lp.token_id != lp.top[0].token_id
    assert contested >= 3  # the check above ran on real choices
    # XTC at probability 0 does nothing.
    off = SamplerChain().xtc(probability=0.0, threshold=threshold).dist()
    plain = SamplerChain().dist()
    assert ids(llama, PROMPT, CompletionOptions(32, seed=2, sampler_chain=off)) == ids(
        llama, PROMPT, CompletionOptions(32, seed=2, sampler_chain=plain)
    )


def test_flat_xtc_and_top_n_sigma_act_in_the_default_chain(llama: Llama) -> None:
    base = CompletionOptions(32, temperature=1.0, seed=8)
    plain = ids(llama, PROMPT, base)
    assert ids(llama, PROMPT, base.with_xtc(1.0, 0.05)) != plain
    # A tiny sigma keeps only the top logit: greedy whatever the temperature.
    assert ids(llama, PROMPT, base.with_top_n_sigma(1e-6)) == ids(llama, PROMPT, CompletionOptions(32))


def test_adaptive_p_is_seeded_and_differs_from_dist(llama: Llama) -> None:
    options = CompletionOptions(32, temperature=1.0, seed=3).with_adaptive_p(0.3, 0.9)
    first = ids(llama, PROMPT, options)
    assert first == ids(llama, PROMPT, options)
    assert first != ids(llama, PROMPT, CompletionOptions(32, temperature=1.0, seed=3))
    chain = SamplerChain().min_p(0.05).adaptive_p(0.3, 0.9)
    assert ids(llama, PROMPT, CompletionOptions(32, seed=3, sampler_chain=chain)) == ids(
        llama, PROMPT, CompletionOptions(32, seed=3, temperature=1.0, min_p=0.05, samplers=("min_p", "adaptive_p"), adaptive_target=0.3)
    )


def test_min_keep_keeps_candidates(llama: Llama) -> None:
    # top_p 0 keeps one token (greedy); min_keep 50 keeps fifty, so seeds differ again.
    greedy = ids(llama, PROMPT, CompletionOptions(24))
    for keep, same in ((0, True), (50, False)):
        chain = SamplerChain().top_p(0.0, min_keep=keep).temp(1.5).dist()
        runs = [ids(llama, PROMPT, CompletionOptions(24, seed=s, sampler_chain=chain)) for s in (1, 2)]
        assert (runs[0] == runs[1] == greedy) is same


# ---- end of generation --------------------------------------------------------------------
def test_min_tokens_delays_eos(llama: Llama) -> None:
    eager = CompletionOptions(32, logit_bias={eos_id(llama): 50.0})
    done = llama.create_completion(PROMPT, eager)
    assert done.stop_reason == StopReason.EOS and len(done.token_ids) == 0
    delayed = llama.create_completion(PROMPT, eager.with_min_tokens(5))
    assert delayed.stop_reason == StopReason.EOS
    assert len(delayed.token_ids) == 5


def test_min_tokens_delays_stop_sequences(llama: Llama) -> None:
    free = llama.create_completion(PROMPT, CompletionOptions(24))
    stop = free.text[:3]
    assert llama.create_completion(PROMPT, CompletionOptions(24, stop_sequences=(stop,))).text == ""
    later = llama.create_completion(PROMPT, CompletionOptions(24, stop_sequences=(stop,), min_tokens=4))
    assert later.text.startswith(free.text[: len(stop)])
    assert len(later.token_ids) >= 4


def test_ignore_eos_runs_to_max_tokens(llama: Llama) -> None:
    eager = CompletionOptions(12, logit_bias={eos_id(llama): 50.0})
    done = llama.create_completion(PROMPT, eager.with_ignore_eos())
    assert done.stop_reason == StopReason.LENGTH
    assert len(done.token_ids) == 12
    assert eos_id(llama) not in done.token_ids


# ---- JSON schema -----------------------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_output_parses_and_validates(llama: Llama) -> None:
    done = llama.create_completion("A person as JSON: ", CompletionOptions(80).with_json_schema(SCHEMA))
    assert done.stop_reason == StopReason.EOS, done.text
    jsonschema.validate(json.loads(done.text), SCHEMA)
    # Sampled, too.
    sampled = llama.create_completion("A person as JSON: ", CompletionOptions(80, temperature=1.0, seed=4).with_json_schema(SCHEMA))
    jsonschema.validate(json.loads(sampled.text), SCHEMA)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (CompletionOptions(4, json_schema="{not json"), "json_schema"),
        (CompletionOptions(4, json_schema="[1, 2]"), "json_schema"),
        (CompletionOptions(4, json_schema='{"type": "object"}', grammar='root ::= "a"'), "json_schema"),
        (CompletionOptions(4, mirostat=3), "mirostat"),
        (CompletionOptions(4, dry_sequence_breakers=("",)), "dry_sequence_breakers[0]"),
        (CompletionOptions(4, min_tokens=-1), "min_tokens"),
        (CompletionOptions(4, xtc_probability=1.5), "xtc_probability"),
        (CompletionOptions(4, sampler_chain=SamplerChain((TopK(-1),))), "sampler_chain[0].k"),
        (CompletionOptions(4, sampler_chain=SamplerChain((Greedy(), TopK(3)))), "sampler_chain[0]"),
        (CompletionOptions(4, sampler_chain=SamplerChain((Custom(lambda logits: 0),))), "sampler_chain[0]"),
        (CompletionOptions(4, samplers=("top_k",), sampler_chain=SamplerChain().greedy()), "sampler_chain"),
        # DRY breakers cost a vocabulary scan each: at most 8 per request, in all stages.
        (CompletionOptions(4, dry_sequence_breakers=tuple("abcdefghi")), "dry_sequence_breakers"),
        (CompletionOptions(4, dry_sequence_breakers=("x" * 41,)), "dry_sequence_breakers[0]"),
        (CompletionOptions(4, sampler_chain=SamplerChain((Dry(sequence_breakers=tuple("abcde")), Dry(), Greedy()))), "sampler_chain"),
        (CompletionOptions(4, dry_sequence_breakers=("ab", "cd", "ef")), "dry_sequence_breakers"),
        (CompletionOptions(4, sampler_chain=SamplerChain((Dry(sequence_breakers=("ab", "cd")), Dry(sequence_breakers=("ef",)), Greedy()))), "sampler_chain"),
    ],
)
def test_bad_sampling_options_name_the_field(llama: Llama, options: CompletionOptions, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        llama.create_completion(PROMPT, options)
    assert raised.value.field == field


def test_a_selector_must_be_last() -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        SamplerChain().greedy().top_k(3)
    assert raised.value.field == "sampler_chain[0]"
    with pytest.raises(InvalidArgumentError) as raised:
        SamplerChain().top_p(1.5)
    assert raised.value.field == "sampler_chain[0].p"

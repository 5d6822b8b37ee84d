"""The embedded Gemma 3 tokenizer, built from the GGUF's own vocabulary with the `tokenizers` library.

Why not `AutoTokenizer.from_pretrained(folder, gguf_file=...)`: transformers' GGUF tokenizer
conversion changed between versions. 5.17 builds a Unigram model from the GGUF's scores and drops
the BOS rule ("Hello world, this is a test." -> 12 ids instead of 9, 2x the tokens on Japanese);
5.24 builds the BPE tokenizer Gemma was trained with. A model fed the wrong ids is a different,
much worse model, and nothing fails. So the tokenizer is built here, from the file alone, and saved
with a generic tokenizer class that every transformers 5 version loads from `tokenizer.json` as is.
`check_tokenizer` compares it against a shipped fixture of texts and their ids.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from tunebench.errors import ModelError

FIXTURE = "gemma3_tokenizer_fixture.json"
SPIECE_SPACE = "\u2581"  # sentencepiece writes a space as this character
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass(frozen=True)
class GgufVocabulary:
    """What a GGUF file says about its tokenizer (llama.cpp's `tokenizer.ggml.*` keys)."""

    model: str
    tokens: list[str]
    token_types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool
    add_eos: bool


# --- reading the GGUF's metadata -------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: Path) -> dict:
    """The key/value metadata of a GGUF file (v2 or v3, little-endian), without its tensors.

    Read here rather than with the gguf package because that parses the whole file (~20 s on a small
    CPU) where only the metadata at its head is needed (under a second)."""
    with open(path, "rb") as f:
        def unpack(fmt: str):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(unpack("<Q")).decode("utf-8")

        def value(kind: int):
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                item_kind, count = unpack("<I"), unpack("<Q")
                return [value(item_kind) for _ in range(count)]
            if kind not in _SCALARS:
                raise ModelError(f"{path}: unknown GGUF value type {kind}")
            return unpack(_SCALARS[kind])

        if f.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file")
        version = unpack("<I")
        if version not in (2, 3):
            raise ModelError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
        unpack("<Q")  # tensor count
        entries = unpack("<Q")
        metadata = {}
        try:
            for _ in range(entries):
                key = string()
                metadata[key] = value(unpack("<I"))
        except (struct.error, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: the GGUF's metadata is truncated or corrupt ({exc})") from exc
        return metadata


def gguf_vocabulary(path: Path) -> GgufVocabulary:
    """The tokenizer a GGUF describes; refuses files that are not a sentencepiece (llama-type) vocabulary."""
    meta = read_gguf_metadata(path)
    try:
        vocabulary = GgufVocabulary(
            model=meta["tokenizer.ggml.model"], tokens=meta["tokenizer.ggml.tokens"],
            token_types=meta["tokenizer.ggml.token_type"], bos_id=meta["tokenizer.ggml.bos_token_id"],
            eos_id=meta["tokenizer.ggml.eos_token_id"], unk_id=meta["tokenizer.ggml.unknown_token_id"],
            pad_id=meta["tokenizer.ggml.padding_token_id"], add_bos=meta.get("tokenizer.ggml.add_bos_token", True),
            add_eos=meta.get("tokenizer.ggml.add_eos_token", False))
    except KeyError as exc:
        raise ModelError(f"{path}: the GGUF has no {exc.args[0]} (cannot build its tokenizer)") from exc
    if vocabulary.model != "llama" or len(vocabulary.tokens) != len(vocabulary.token_types):
        raise ModelError(f"{path}: expected a sentencepiece vocabulary (tokenizer.ggml.model 'llama'), "
                         f"found '{vocabulary.model}'")
    return vocabulary


# --- building the tokenizer --------------------------------------------------------------------------------------

def respell(tokens: list[str]) -> list[str]:
    """Gemma's GGUF stores its tokens of 2..31 spaces as real spaces; the tokenizer sees spaces as '▁'."""
    return [SPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]


def derive_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """BPE merges, best first, recovered from a vocabulary that lists none.

    Every way of cutting a token into two tokens of the vocabulary is a merge producing it. Gemma's
    sentencepiece model ranks merges by where the produced token sits in the vocabulary (earlier is
    better; the GGUF's scores do not follow that order), and among the cuts of one token the longer
    left part first -- the order transformers 5.24's conversion uses, which gives the ids Gemma was
    trained on (checked by the fixture)."""
    known = set(tokens)
    merges = []
    for token in tokens:
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in known and right in known:
                merges.append((left, right))
    return merges


def build_tokenizer(vocabulary: GgufVocabulary):
    """A `tokenizers.Tokenizer` equal to Gemma 3's: byte-fallback BPE on text whose spaces are '▁', BOS first,
    control tokens as special tokens and user-defined ones (newline runs, `[multimodal]`) matched whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tokens = respell(vocabulary.tokens)
    if len(set(tokens)) != len(tokens):
        raise ModelError("the GGUF vocabulary spells two tokens the same way; cannot build its tokenizer")
    ids = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(BPE(vocab=ids, merges=derive_merges(tokens), unk_token=tokens[vocabulary.unk_id],
                              fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, vocabulary.token_types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, raw, kind in zip(tokens, vocabulary.tokens, vocabulary.token_types)
                          if kind == USER_DEFINED and t == raw])  # the respelled space runs stay BPE tokens
    tokenizer.post_processor = _post_processor(tokens, vocabulary)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ModelError("the built tokenizer's vocabulary differs in size from the GGUF's")
    return tokenizer


def _post_processor(tokens: list[str], vocabulary: GgufVocabulary):
    from tokenizers import processors

    bos, eos = tokens[vocabulary.bos_id], tokens[vocabulary.eos_id]
    first = [bos] if vocabulary.add_bos else []
    last = [eos] if vocabulary.add_eos else []
    ids = {tokens[vocabulary.bos_id]: vocabulary.bos_id, tokens[vocabulary.eos_id]: vocabulary.eos_id}
    specials = [(t, ids[t]) for t in dict.fromkeys(first + last)]
    single = " ".join(first + ["$A:0"] + last)
    pair = " ".join([f"{t}:1" for t in first] + ["$B:1"] + [f"{t}:1" for t in last])
    return processors.TemplateProcessing(single=single, pair=f"{single} {pair}", special_tokens=specials)


def save_tokenizer(tokenizer, vocabulary: GgufVocabulary, folder: Path) -> None:
    """Write tokenizer.json and a tokenizer_config.json that names the generic class.

    A model-specific class (GemmaTokenizer) may rebuild parts of the pipeline from its own defaults
    in some transformers versions; the generic `PreTrainedTokenizerFast` takes `tokenizer.json` as is."""
    tokens = vocabulary.tokens
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[vocabulary.bos_id], "eos_token": tokens[vocabulary.eos_id],
        "unk_token": tokens[vocabulary.unk_id], "pad_token": tokens[vocabulary.pad_id], "mask_token": "<mask>",
        "add_bos_token": vocabulary.add_bos, "add_eos_token": vocabulary.add_eos,
        "padding_side": "left",  # what GemmaTokenizer used, kept so batched generation pads the same way
        "model_max_length": 32768, "clean_up_tokenization_spaces": False,
    }
    if "<mask>" not in tokens:
        del config["mask_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# --- checking it ------------------------------------------------------------------------------------------------

def load_fixture() -> dict:
    """The shipped texts with the ids Gemma 3's tokenizer gives them, and the NLL passage and bound."""
    return json.loads(files("tunebench.models").joinpath(FIXTURE).read_text(encoding="utf-8"))


def tokenizer_mismatches(tokenizer, fixture: dict) -> list[str]:
    """One line per fixture text whose ids differ (empty when the tokenizer is right)."""
    problems = []
    for case in fixture["texts"]:
        got = tokenizer(case["text"])["input_ids"]
        if got != case["ids"]:
            first = next((i for i, (a, b) in enumerate(zip(got, case["ids"])) if a != b), min(len(got), len(case["ids"])))
            problems.append(f"{case['name']}: {len(got)} ids instead of {len(case['ids'])}, first difference at {first}")
    return problems


def verify_tokenizer(tokenizer, source: Path) -> None:
    """Refuse a tokenizer that does not give the fixture's ids, naming the transformers version."""
    import transformers

    problems = tokenizer_mismatches(tokenizer, load_fixture())
    if problems:
        raise ModelError(
            f"{source}: the embedded Gemma 3 tokenizer gives other ids than Gemma's under transformers "
            f"{transformers.__version__} ({len(problems)} fixture texts differ; {problems[0]}); report this with "
            "the transformers and tokenizers versions (pip show transformers tokenizers)")


def check_tokenizer(folder: Path):
    """Load `folder`'s tokenizer the way every run does; refuse it unless it gives the fixture's ids, else return it."""
    import transformers
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001  (a corrupt tokenizer.json raises many kinds)
        raise ModelError(f"{folder}: the embedded tokenizer cannot be loaded under transformers "
                         f"{transformers.__version__}: {exc}") from exc
    verify_tokenizer(tokenizer, folder)
    return tokenizer


def build_from_gguf(gguf_path: Path, folder: Path):
    """Build, save and check the tokenizer a GGUF describes; return it as transformers loads it."""
    vocabulary = gguf_vocabulary(gguf_path)
    save_tokenizer(build_tokenizer(vocabulary), vocabulary, folder)
    return check_tokenizer(folder)


def main(argv: list[str] | None = None) -> int:
    """`python -m tunebench.models.gemma_tokenizer GGUF FOLDER`: build and check (used by .ci/tokenizer-versions)."""
    import transformers

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tunebench.models.gemma_tokenizer GGUF FOLDER", file=sys.stderr)
        return 2
    try:
        build_from_gguf(Path(args[0]), Path(args[1]))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"transformers {transformers.__version__}: the tokenizer built from {Path(args[0]).name} "
          f"gives the fixture's ids ({len(load_fixture()['texts'])} texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

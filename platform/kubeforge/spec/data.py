"""`spec.data`: where documents come from and how they become token shards."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from kubeforge.filesystems import check_uri, is_uri
from kubeforge.spec.base import StrictModel, Toggle

# Directories of the standard library that are tests or vendored tooling, not library code:
# they are full of deliberately odd inputs that teach a language model nothing useful.
STDLIB_DEFAULT_EXCLUDE = (
    "test/*",
    "*/test/*",
    "*/tests/*",
    "idlelib/idle_test/*",
    "lib2to3/tests/*",
    "site-packages/*",
)


def stdlib_dir() -> Path:
    """Where the running interpreter's standard library (the `python-stdlib` source) lives."""
    return Path(sysconfig.get_paths()["stdlib"])


class StdlibSource(StrictModel):
    """The running interpreter's standard-library `.py` files: the built-in demo corpus."""

    type: Literal["python-stdlib"]
    exclude: tuple[str, ...] = STDLIB_DEFAULT_EXCLUDE
    """Glob patterns, relative to the standard-library directory, of files to leave out."""
    max_files: Annotated[int, Field(gt=0)] | None = None
    """Read at most this many files (sorted by path) — for quick experiments."""


def _source_path(path: str) -> str:
    # An object-store URI's form is checked here, offline; whether it matches objects is known only when
    # the data stage lists it, with the store's credentials.
    if is_uri(path):
        problem = check_uri(path)
        if problem is not None:
            raise ValueError(f"'{path}': {problem}")
    return path


class FilesSource(StrictModel):
    """Files or globs of `.txt`, `.jsonl` or `.parquet`, local or in an object store (`s3://`)."""

    type: Literal["files"]
    paths: Annotated[tuple[Annotated[str, AfterValidator(_source_path)], ...], Field(min_length=1)]
    """Files or glob patterns (`*`, `?`, `**`); relative paths are resolved against the manifest's directory.
    `s3://bucket/key` URIs (globs in the key) are read from S3 or an S3-compatible store with the credentials,
    region and endpoint of the standard AWS environment variables (docs/stages.md)."""
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    """`auto` picks the reader from each file's extension."""
    text_field: Annotated[str, Field(min_length=1)] = "text"
    """Field holding the document text in `.jsonl` records and `.parquet` columns."""


class ServedTrafficSource(StrictModel):
    """The sample a deployment captured (`spec.capture` of a ModelDeployment): its answered requests."""

    type: Literal["served-traffic"]
    paths: Annotated[tuple[Annotated[str, AfterValidator(_source_path)], ...], Field(min_length=1)]
    """Capture folders (their `traffic-*.parquet` files), or capture files and globs; local (relative to the
    manifest's directory) or in an object store, like `files` sources."""
    text: Literal["prompt", "completion", "both"] = "both"
    """What becomes a document: the prompt, the answer, or the prompt, a newline and the answer. Requests
    that did not succeed (status other than 200) are left out."""
    until: Annotated[float, Field(gt=0)] | None = None
    """Only requests answered at or before this instant (UNIX seconds): a run reads the same rows however
    much traffic arrives later, and a new instant is a new cache key (the retraining loop sets the instant
    of its trigger). Null reads every captured request."""

    def patterns(self) -> tuple[str, ...]:
        """The file patterns `paths` stands for: a folder means its capture files."""
        return tuple(p if p.endswith(".parquet") or any(c in p for c in "*?[") else f"{p.rstrip('/')}/traffic-*.parquet"
                     for p in self.paths)


Source = Annotated[StdlibSource | FilesSource | ServedTrafficSource, Field(discriminator="type")]

# Discriminator values appear in pydantic's error locations; the error formatter drops them so
# that paths read `spec.data.sources[0].paths`, not `spec.data.sources[0].files.paths`.
SOURCE_TAGS = ("python-stdlib", "files", "served-traffic")


class NormalizeStep(Toggle):
    """Unicode and whitespace normalisation."""

    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFC"
    """Unicode normalisation form applied to every document."""
    strip_trailing_whitespace: bool = True
    """Remove spaces and tabs at line ends (line endings always become `\\n`)."""
    max_consecutive_blank_lines: Annotated[int, Field(ge=0)] | None = 2
    """Collapse longer runs of blank lines to this many; null keeps them."""


class ExactDedupStep(Toggle):
    """Drop documents whose normalised text is byte-identical to an earlier one."""


class FuzzyDedupStep(Toggle):
    """MinHash LSH near-duplicate removal: one document of each cluster is kept."""

    threshold: Annotated[float, Field(gt=0, le=1)] = 0.7
    """Jaccard similarity of shingle sets at or above which two documents are duplicates (MinHash LSH finds
    the candidate pairs, each is then checked exactly)."""
    num_perm: Annotated[int, Field(ge=16, le=1024)] = 128
    """Number of MinHash permutations (signature length)."""
    shingle_size: Annotated[int, Field(ge=1, le=32)] = 5
    """Length, in words, of the shingles hashed into the signature."""
    seed: int = 1
    """Seed of the MinHash permutations."""


class QualityStep(Toggle):
    """Heuristic quality filters in the style of Gopher and C4; null switches a rule off."""

    min_chars: Annotated[int, Field(ge=0)] | None = 200
    """Shortest document kept, in characters."""
    max_chars: Annotated[int, Field(gt=0)] | None = 500_000
    """Longest document kept, in characters."""
    max_symbol_ratio: Annotated[float, Field(gt=0, le=1)] | None = 0.5
    """Largest share of characters that are neither letters, digits nor whitespace."""
    max_digit_ratio: Annotated[float, Field(gt=0, le=1)] | None = 0.3
    """Largest share of characters that are digits."""
    min_alpha_word_fraction: Annotated[float, Field(ge=0, le=1)] | None = 0.4
    """Smallest share of words that contain at least one letter."""
    max_duplicate_line_fraction: Annotated[float, Field(gt=0, le=1)] | None = 0.5
    """Largest share of non-blank lines that repeat an earlier line of the same document."""
    max_top_ngram_fraction: dict[Annotated[int, Field(ge=2, le=10)], Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: {2: 0.25, 3: 0.2, 4: 0.18}
    )
    """For each n, the largest share of word characters covered by the most frequent word n-gram."""
    max_duplicate_ngram_fraction: dict[Annotated[int, Field(ge=2, le=20)], Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: {5: 0.6, 10: 0.5}
    )
    """For each n, the largest share of word characters inside word n-grams seen earlier in the document."""


class PerplexityStep(StrictModel):
    """Drop documents a reference character n-gram model finds unlikely.

    The reference model is a character n-gram language model with interpolated Kneser-Ney
    smoothing, trained when the stage runs on `reference` (by default the standard library).
    """

    enabled: bool = False
    """Off by default: the reference model is rebuilt on every run and scoring is pure Python."""
    reference: Annotated[tuple[Source, ...], Field(min_length=1)] = (StdlibSource(type="python-stdlib"),)
    """Text the reference model learns what good documents look like from."""
    order: Annotated[int, Field(ge=2, le=8)] = 4
    """Character n-gram order of the reference model."""
    max_perplexity: Annotated[float, Field(gt=1)] = 12.0
    """Documents whose per-character perplexity under the reference model exceeds this are removed."""
    max_reference_chars: Annotated[int, Field(gt=0)] = 2_000_000
    """Train the reference model on at most this many characters (it is rebuilt on every run)."""


class RedactStep(Toggle):
    """Replace personal data and secrets with typed placeholders such as `<EMAIL>`."""

    emails: bool = True
    ip_addresses: bool = True
    phone_numbers: bool = True
    secrets: bool = True
    """Key-like strings: AWS access keys, private-key blocks, GitHub/Slack tokens, `api_key = "..."`."""


PARAPHRASE_PLACEHOLDER = "{text}"
DEFAULT_PARAPHRASE_PROMPT = (
    "Paraphrase the following text. Keep its meaning, facts, names, numbers and any code unchanged. "
    "Answer with the paraphrase only.\n\n{text}"
)


class SynonymsSpec(StrictModel):
    """Copies of each document with a share of its words replaced by WordNet synonyms, read offline from
    Debian's `wordnet-base` (`/usr/share/wordnet`).

    Eligible words are whole whitespace-separated words of at least three ASCII letters (sentence
    punctuation around them aside) that are not stop words, Python keywords or built-in names, not
    camelCase, and have a synonym in a WordNet synset listing that exact word. A synonym keeps the
    word's capitalisation; multi-word synonyms are written with spaces. Tokens that look like code
    (`a.b`, `snake_case`, `f(x)`, `x=1`) are never touched, but a plain word used as a name in code can
    be: synonyms are meant for prose.
    """

    replace_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Share of a document's eligible words replaced in each copy (rounded, at least one); a document
    without eligible words gets no copy."""
    copies: Annotated[int, Field(ge=1, le=16)] = 1
    """Augmented copies made of each document, each with its own draw of words and synonyms."""
    seed: int = 0
    """Seeds each document's draws together with its id: the same document, seed and WordNet always give
    the same copies."""


class ParaphraseSpec(StrictModel):
    """Documents rewritten by a language model behind an OpenAI-compatible chat completions API
    (`<endpoint>/chat/completions`: OpenAI, vLLM, Ray Serve LLM, `kubeforge serve`, ...).

    Documents are sent after redaction, so personal data never reaches the endpoint. Failed requests
    are retried by the client (connection errors, timeouts, HTTP 408/409/429 and 5xx); when the
    retries run out the stage fails naming the endpoint, the HTTP status and the response body.
    """

    endpoint: Annotated[str, Field(pattern=r"^https?://")]
    """Base URL of the API, with its version prefix (e.g. `http://127.0.0.1:8000/v1`)."""
    model: Annotated[str, Field(min_length=1)]
    """Model name sent with each request (`/v1/models` lists what the endpoint serves)."""
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    """Name of the environment variable that holds the API key (sent as a bearer token); null sends
    none. The key itself never belongs in the manifest."""
    prompt_template: Annotated[str, Field(min_length=1)] = DEFAULT_PARAPHRASE_PROMPT
    """The user message sent for each document: `{text}` is replaced by the document's text; other
    braces are kept as written."""
    max_tokens: Annotated[int, Field(ge=1)] = 512
    """Most tokens generated for one paraphrase."""
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    """Sampling temperature of the paraphrases."""
    sampling_seed: int | None = None
    """Sent with each request as `seed`, for servers that sample reproducibly with it (OpenAI, vLLM,
    `kubeforge serve`); null sends none."""
    max_concurrency: Annotated[int, Field(ge=1, le=256)] = 4
    """Requests in flight at once for each batch of documents a worker paraphrases."""
    max_retries: Annotated[int, Field(ge=0, le=20)] = 3
    """Retries of a failed request (with exponential back-off, or the server's Retry-After) before the
    stage fails."""
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    """Seconds one request may take before it counts as failed (and is retried)."""
    document_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Share of documents paraphrased, each chosen by a hash of its id and `seed` (the same on every run)."""
    seed: int = 0
    """Seeds which documents are chosen."""

    @field_validator("prompt_template")
    @classmethod
    def _template_has_placeholder(cls, template: str) -> str:
        if PARAPHRASE_PLACEHOLDER not in template:
            raise ValueError(
                f"must contain the placeholder {PARAPHRASE_PLACEHOLDER}, where each document's text goes "
                f"(got {template[:60]!r})"
            )
        return template


class AugmentStep(StrictModel):
    """Optional: augmented copies of the cleaned documents (after redact, before the tokenizer), each
    carrying the id of the document it comes from. `synonyms` and `paraphrase` each run only when given."""

    enabled: bool = False
    """Off by default: paraphrasing sends documents to an LLM endpoint, and synonyms need WordNet
    installed. Off, the step is skipped and reported as such in the data card."""
    synonyms: SynonymsSpec | None = None
    """Replace words with WordNet synonyms; off unless given."""
    paraphrase: ParaphraseSpec | None = None
    """Rewrite documents with a language model; off unless given."""

    @model_validator(mode="after")
    def _something_to_do(self) -> AugmentStep:
        if self.enabled and self.synonyms is None and self.paraphrase is None:
            raise ValueError("enabled, but neither synonyms nor paraphrase is given")
        return self


class TokenizerSpec(StrictModel):
    """Tokenizer trained on the cleaned corpus with Hugging Face `tokenizers`."""

    type: Literal["bpe", "unigram"] = "bpe"
    """`bpe`: byte-level BPE (GPT-2 style). `unigram`: SentencePiece-style unigram with Metaspace."""
    vocab_size: Annotated[int, Field(ge=300, le=262_144)] = 4096
    """Largest vocabulary, special tokens included."""
    min_frequency: Annotated[int, Field(ge=1)] = 2
    """BPE: fewest occurrences of a merge; unigram: words rarer than this are left out of training."""
    max_training_characters: Annotated[int, Field(gt=0)] | None = 50_000_000
    """Learn from a sample of about this many characters of the training split (each document drawn by a
    hash of its id, the same on every run); null learns from all of it."""


class PackingSpec(StrictModel):
    """Tokenise, split by document and pack into fixed-length sequences."""

    seq_len: Annotated[int, Field(ge=8, le=131_072)] = 256
    """Tokens per packed sequence; at most the model's max_position_embeddings."""
    validation_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Share of documents (not tokens) held out for validation."""
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Share of documents held out for testing."""
    sequences_per_shard: Annotated[int, Field(gt=0)] = 2048
    """Rows per `.npy` shard file."""
    seed: int = 0
    """Seeds the document-level split, so a document stays in the same split across reruns."""

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> PackingSpec:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "validation_fraction + test_fraction must be < 1 "
                f"(got {self.validation_fraction} + {self.test_fraction})"
            )
        return self


class DataSpec(StrictModel):
    """The data stage: read, clean, deduplicate, filter, redact, augment, tokenise and pack."""

    sources: Annotated[tuple[Source, ...], Field(min_length=1)]
    normalize: NormalizeStep = NormalizeStep()
    exact_dedup: ExactDedupStep = ExactDedupStep()
    fuzzy_dedup: FuzzyDedupStep = FuzzyDedupStep()
    quality: QualityStep = QualityStep()
    perplexity: PerplexityStep = PerplexityStep()
    redact: RedactStep = RedactStep()
    augment: AugmentStep = AugmentStep()
    """Augmented copies of the cleaned documents (WordNet synonyms, LLM paraphrases); off by default."""
    tokenizer: TokenizerSpec = TokenizerSpec()
    packing: PackingSpec = PackingSpec()

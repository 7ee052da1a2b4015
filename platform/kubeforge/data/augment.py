"""The data stage's optional `augment` step as pure batch functions: WordNet synonym replacement and
paraphrases by a language model behind an OpenAI-compatible API.

The data stage calls them inside Ray workers, on pandas batches of documents (`id`, `source`, `text`;
other columns are ignored). They are module-level functions that get their manifest section as an
argument and read no driver state, so a worker imports them by name. Each returns only the new
documents (`COLUMNS`: `id`, `source`, `text`, `augmented_from`, `augmentation`) and counts that add up
over batches. Before any work, the stage calls `preflight(spec.augment)`, which refuses a missing
WordNet or API key in one line instead of failing in every worker.

* Synonyms: WordNet 3.0 from Debian's `wordnet-base` (`/usr/share/wordnet`), read offline with
  nltk's reader; nothing is downloaded. The reader and each word's synonyms are cached per process.
  A document's draws come from a `random.Random` seeded by a SHA-256 of the seed and its id, so the
  same document, seed and WordNet always give the same copies, in any worker and batch.
* Paraphrases: `<endpoint>/chat/completions` through the `openai` client (its retries, back-off and
  timeout), `max_concurrency` requests at a time per batch. Chat rather than `/completions`: every
  instruction-following model and server (OpenAI, vLLM, Ray Serve LLM, `kubeforge serve`) answers it
  with the model's own chat template, while plain completions are legacy at OpenAI and would need a
  prompt format per model.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import functools
import hashlib
import keyword
import os
import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeforge.errors import StageError
from kubeforge.spec.data import PARAPHRASE_PLACEHOLDER, AugmentStep, ParaphraseSpec, SynonymsSpec

if TYPE_CHECKING:
    import openai
    import pandas as pd

COLUMNS = ("id", "source", "text", "augmented_from", "augmentation")
"""The columns of every frame these functions return."""
SYNONYMS = "synonyms"
PARAPHRASE = "paraphrase"
SYNONYM_STATS = ("documents_in", "documents_out", "documents_without_synonyms", "eligible_words", "words_replaced")
"""Counts `synonym_documents` returns: documents read and made, documents with no word to replace, words
that have a synonym (summed over documents), words replaced (summed over copies)."""
PARAPHRASE_STATS = (
    "documents_in", "documents_selected", "documents_out", "requests", "retries", "truncated",
    "prompt_tokens", "completion_tokens",
)
"""Counts `paraphrase_documents` returns: documents read, chosen by `document_fraction`, paraphrased;
HTTP requests sent and how many of them were retries; paraphrases cut at `max_tokens`; tokens the
endpoint reports."""

WORDNET_DIR = Path("/usr/share/wordnet")
"""Where Debian's `wordnet-base` installs the WordNet 3.0 database."""
WORDNET_FILES = (
    *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")),
    *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")),
)
"""The database files the synonyms read."""

# ---------------------------------------------------------------------------------------------
# WordNet


# WordNet 3.0's lexicographer files, in file-number order (lexnames(5WN)). nltk's reader reads them
# from a `lexnames` file of the Princeton distribution, which Debian's wordnet-base does not ship (it
# documents the list in a man page); the reader is handed this list instead of a copied file.
_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def require_wordnet(directory: Path = WORDNET_DIR) -> None:
    """Raise the one error that says how to install WordNet when `directory` lacks its files."""
    missing = [name for name in WORDNET_FILES if not (directory / name).is_file()]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise StageError(
            "data",
            f"augment.synonyms needs WordNet, but {directory} lacks {shown}: install the Debian package "
            "wordnet-base (`apt-get install wordnet-base`; infra/local/install.sh does it)",
        )


@functools.lru_cache(maxsize=2)
def _wordnet(directory: str) -> Any:
    """nltk's WordNet reader over Debian's files, once per process (loading the indexes takes a second)."""
    require_wordnet(Path(directory))
    import io

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class DebianWordNet(WordNetCorpusReader):
        def open(self, file: str) -> Any:
            if file == "lexnames":
                return io.StringIO("".join(
                    f"{number:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n"
                    for number, name in enumerate(_LEXNAMES)
                ))
            return super().open(file)

        def map_wn(self, version: str = "wordnet") -> None:
            # This is the reference WordNet 3.0 itself: there is no other version's sense index to map
            # from (nltk would look for a downloaded `wordnet` corpus to build that map).
            return None

    # nltk reads corpora only from directories on its data path.
    if directory not in nltk.data.path:
        nltk.data.path.append(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": none are used
        return DebianWordNet(directory, None)


# Short function words that WordNet lists as rare nouns ("can" as a tin, "will" as volition): replacing
# them changes what a sentence says. Python keywords and built-in names are code far more often.
_STOP_WORD_LIST = """
    about above after again against all also although among and another any are around because been
    before being below between both but can cannot could did does doing down during each either else
    even ever every few for from further had has have having her here hers herself him himself his how
    however into its itself just least less many may might more most much must myself neither never
    nor not now off once one only onto other otherwise our ours ourselves out over own per quite rather
    same several shall she should since some such than that the their theirs them themselves then
    there these they this those though through thus too toward towards under until upon very was were
    what whatever when whence where whether which while who whom whose why will with within without
    would yet you your yours yourself yourselves
"""
_STOP_WORDS = frozenset(
    [*_STOP_WORD_LIST.split(), *keyword.kwlist, *keyword.softkwlist, *(name.lower() for name in dir(builtins))]
)
# A whole whitespace-separated token: optional opening punctuation, the word, optional sentence
# punctuation. Anything else in the token (`.`, `_`, `(`, `=`, digits, backquotes) marks code.
_TOKEN = re.compile(r"\S+")
_WORD = re.compile(r"[(\[{\"']*([A-Za-z]{3,})[)\]}\"'.,;:!?]*")
_SYNONYM = re.compile(r"[a-z]+(?:[ '-][a-z]+)*")


@functools.lru_cache(maxsize=1 << 16)
def _synonyms(directory: str, word: str) -> tuple[str, ...]:
    """WordNet synonyms of lowercase `word`, in WordNet's order, from the synsets that list this exact
    form (so `running` gets no `run` synonyms such as `scat`): lowercase lemmas only (no proper nouns),
    multi-word lemmas with spaces, never the word itself."""
    found: list[str] = []
    for synset in _wordnet(directory).synsets(word):
        names = synset.lemma_names()
        if word not in names:
            continue
        for name in names:
            candidate = name.replace("_", " ")
            if candidate != word and _SYNONYM.fullmatch(candidate) and candidate not in found:
                found.append(candidate)
    return tuple(found)


def _eligible(text: str, directory: str) -> Iterator[tuple[int, int, str, tuple[str, ...]]]:
    """(start, end, word, synonyms) of each word that may be replaced, in text order."""
    for token in _TOKEN.finditer(text):
        match = _WORD.fullmatch(token.group())
        if match is None:
            continue
        word = match.group(1)
        # lowercase or Capitalised only: ALL-CAPS words are acronyms and constants, camelCase is code.
        if not (word.islower() or (word[0].isupper() and word[1:].islower())):
            continue
        lower = word.lower()
        if lower in _STOP_WORDS:
            continue
        synonyms = _synonyms(directory, lower)
        if synonyms:
            start = token.start() + match.start(1)
            yield start, start + len(word), word, synonyms


def _with_case_of(synonym: str, word: str) -> str:
    return synonym[0].upper() + synonym[1:] if word[0].isupper() else synonym


def _seed(*parts: object) -> int:
    """A 64-bit seed from the parts' text: stable across processes (Python's `hash` is salted)."""
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big")


def synonym_documents(
    frame: pd.DataFrame, spec: SynonymsSpec, *, wordnet_dir: Path = WORDNET_DIR,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """`spec.copies` copies of each document of `frame` with `replace_fraction` of its eligible words
    (rounded, at least one) replaced by WordNet synonyms; a document without eligible words gets none.

    Returns the copies only (`COLUMNS`; ids `<id>#synonyms-<n>`, n from 1, `augmentation` `synonyms`)
    and the counts of `SYNONYM_STATS`. Raises `StageError` when WordNet is missing, before any work.
    """
    directory = str(wordnet_dir)
    _wordnet(directory)
    stats = dict.fromkeys(SYNONYM_STATS, 0)
    rows = []
    for doc_id, source, text in zip(frame["id"], frame["source"], frame["text"], strict=True):
        stats["documents_in"] += 1
        slots = list(_eligible(text, directory))
        stats["eligible_words"] += len(slots)
        if not slots:
            stats["documents_without_synonyms"] += 1
            continue
        rng = random.Random(_seed(SYNONYMS, spec.seed, doc_id))
        count = max(1, round(spec.replace_fraction * len(slots)))
        for copy in range(1, spec.copies + 1):
            pieces, end = [], 0
            for i in sorted(rng.sample(range(len(slots)), count)):
                start, stop, word, synonyms = slots[i]
                pieces += [text[end:start], _with_case_of(rng.choice(synonyms), word)]
                end = stop
            pieces.append(text[end:])
            rows.append((f"{doc_id}#{SYNONYMS}-{copy}", source, "".join(pieces), doc_id, SYNONYMS))
            stats["words_replaced"] += count
    stats["documents_out"] = len(rows)
    return _frame(rows), stats


# ---------------------------------------------------------------------------------------------
# paraphrases

_BODY_CHARS = 500
"""How much of an error response's body the stage's error shows."""
_PLACEHOLDER_KEY = "unused"
"""Sent as the bearer token when `api_key_env` is null (the client needs one; keyless servers ignore it).
Passing it also stops the client from sending an OPENAI_API_KEY it finds in the environment."""


def paraphrase_selected(doc_id: str, spec: ParaphraseSpec) -> bool:
    """Whether `spec` paraphrases the document `doc_id`: a hash of the seed and id below `document_fraction`."""
    return spec.document_fraction >= 1 or _seed(PARAPHRASE, spec.seed, doc_id) < spec.document_fraction * 2**64


def api_key(spec: ParaphraseSpec) -> str | None:
    """The key in `spec.api_key_env` (None when null); StageError when that variable is unset or empty."""
    if spec.api_key_env is None:
        return None
    key = os.environ.get(spec.api_key_env, "").strip()
    if not key:
        raise StageError(
            "data",
            f"augment.paraphrase.api_key_env: the environment variable {spec.api_key_env} is not set or empty; "
            f"it must hold the API key for {spec.endpoint}",
        )
    return key


def paraphrase_documents(frame: pd.DataFrame, spec: ParaphraseSpec) -> tuple[pd.DataFrame, dict[str, int]]:
    """A paraphrase of each document of `frame` that `paraphrase_selected` chooses, by the model at
    `spec.endpoint`, at most `spec.max_concurrency` requests at a time.

    Returns the paraphrases only (`COLUMNS`; ids `<id>#paraphrase`, `augmentation` `paraphrase`), in the
    order of `frame`, and the counts of `PARAPHRASE_STATS`. Raises one `StageError` naming the endpoint
    and the document when a request fails after the client's `max_retries` retries (with the HTTP status
    and the start of the response's body), when the endpoint cannot be reached or does not answer in
    time, and when a completion is empty.
    """
    import openai

    stats = dict.fromkeys(PARAPHRASE_STATS, 0)
    stats["documents_in"] = len(frame)
    chosen = [
        (doc_id, source, text)
        for doc_id, source, text in zip(frame["id"], frame["source"], frame["text"], strict=True)
        if paraphrase_selected(str(doc_id), spec)
    ]
    stats["documents_selected"] = len(chosen)
    if not chosen:
        return _frame([]), stats
    client = openai.OpenAI(
        base_url=spec.endpoint, api_key=api_key(spec) or _PLACEHOLDER_KEY,
        max_retries=spec.max_retries, timeout=spec.timeout_s,
    )
    with client, concurrent.futures.ThreadPoolExecutor(
        max_workers=min(spec.max_concurrency, len(chosen)), thread_name_prefix="paraphrase"
    ) as pool:
        futures = [pool.submit(_paraphrase, client, spec, doc_id, text) for doc_id, _, text in chosen]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        errors = [error for future in futures if future.done() and (error := future.exception()) is not None]
        if errors:
            for future in futures:
                future.cancel()  # those not started; the pool waits for those in flight
            raise errors[0]
        answers = [future.result() for future in futures]
    rows = []
    for (doc_id, source, _), answer in zip(chosen, answers, strict=True):
        rows.append((f"{doc_id}#{PARAPHRASE}", source, answer.text, doc_id, PARAPHRASE))
        stats["requests"] += 1 + answer.retries
        stats["retries"] += answer.retries
        stats["truncated"] += answer.truncated
        stats["prompt_tokens"] += answer.prompt_tokens
        stats["completion_tokens"] += answer.completion_tokens
    stats["documents_out"] = len(rows)
    return _frame(rows), stats


@dataclass(frozen=True)
class _Answer:
    text: str
    retries: int
    truncated: bool
    prompt_tokens: int
    completion_tokens: int


def _paraphrase(client: openai.OpenAI, spec: ParaphraseSpec, doc_id: object, text: str) -> _Answer:
    import openai

    where = f"augment.paraphrase: {spec.endpoint}"
    prompt = spec.prompt_template.replace(PARAPHRASE_PLACEHOLDER, text)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=spec.model, messages=[{"role": "user", "content": prompt}],
            max_tokens=spec.max_tokens, temperature=spec.temperature,
            seed=openai.omit if spec.sampling_seed is None else spec.sampling_seed,
        )
        completion = raw.parse()
    except openai.APIStatusError as error:
        status = error.status_code
        retried = status in (408, 409, 429) or status >= 500
        body = " ".join(error.response.text.split())
        if len(body) > _BODY_CHARS:
            body = body[:_BODY_CHARS] + "..."
        raise StageError(
            "data",
            f"{where} answered HTTP {status} for document {doc_id!r}{_after(spec, retried)}: {body or '(empty body)'}",
            resumable=retried,
        ) from None
    except openai.APITimeoutError:
        raise StageError(
            "data",
            f"{where} did not answer document {doc_id!r} within timeout_s={spec.timeout_s:g}{_after(spec, True)}",
            resumable=True,
        ) from None
    except openai.APIConnectionError as error:
        cause = error.__cause__ or error
        raise StageError(
            "data", f"cannot reach {spec.endpoint} (augment.paraphrase){_after(spec, True)}: {cause}", resumable=True,
        ) from None
    except openai.OpenAIError as error:  # a 200 that is not a chat completion
        raise StageError("data", f"{where} sent an answer for document {doc_id!r} that is not a chat "
                                 f"completion: {error}") from None
    choice = completion.choices[0] if getattr(completion, "choices", None) else None
    content = (choice.message.content or "").strip() if choice is not None else ""
    if not content:
        raise StageError("data", f"{where} sent an empty completion for document {doc_id!r} (model {spec.model})")
    usage = completion.usage
    return _Answer(
        content, raw.retries_taken, choice is not None and choice.finish_reason == "length",
        usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
    )


def _after(spec: ParaphraseSpec, retried: bool) -> str:
    if not retried or not spec.max_retries:
        return ""
    return f" after {spec.max_retries} {'retry' if spec.max_retries == 1 else 'retries'}"


# ---------------------------------------------------------------------------------------------


def preflight(step: AugmentStep, *, wordnet_dir: Path = WORDNET_DIR) -> None:
    """What the data stage calls before any work when `step` is enabled: StageError when WordNet is
    missing for `synonyms` or the API key variable is unset for `paraphrase` (checked in the driver's
    environment; the workers read the key from their own)."""
    if not step.enabled:
        return
    if step.synonyms is not None:
        require_wordnet(wordnet_dir)
    if step.paraphrase is not None:
        api_key(step.paraphrase)


def _frame(rows: list[tuple[str, str, str, str, str]]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(rows, columns=list(COLUMNS), dtype=object)

"""Harvesting: feedback rows since the watermark -> validated, versioned ``feedback`` records.

Each feedback row becomes one record whose ``text`` is the prompt followed by (its meta's
``prompt_chars`` marks where the prompt ends, so training masks the prompt out of the loss and
takes it exactly as it was served, see :mod:`lmcore.data.served`):

* the user's correction, when there is one (split ``train`` or ``holdout``);
* the model's completion, for a thumbs-up without correction (``train`` or ``holdout``);
* the model's completion, for a thumbs-down without correction: a *negative* example kept for
  evaluation, never for training (split ``negative``).

Each row also yields preference pairs (:func:`preference_pairs`), versioned as the registry's
``preference`` kind under ``expectations/preference.json``: a correction is *chosen* over the
completion it corrects (*rejected*); a thumbs-up and a thumbs-down on the same prompt (within
one harvest batch) pair up the same way. Every pair records the model version that served the
rejected text. Ratings left unpaired are kept for evaluation only (the ``negative`` split): no
KTO-style objective trains on them. The DPO stage (``lmcore.training.dpo``) and the gate's
preference check read the pairs.

A ``feedback.holdout_fraction`` of the train records, chosen by a hash of the record id (so
the same text always lands on the same side), is marked ``holdout``: the gate can check
whether the users' corrections were learnt without having trained on them. Only
``meta.split == "train"`` records are for training (:func:`is_trainable`).

Rows are claimed from the feedback store by advancing its watermark (see
``lmcore.feedback.store.FeedbackStore.claim``), validated by the ``feedback`` GX suite (personal data
is quarantined) and versioned as a ``data/feedback`` shard through the data registry. A batch
whose ingest fails is handed back and retried by the next harvest, so nothing is lost or
appended twice; a harvest with nothing new does nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from lmcore.config import DataParams
from lmcore.data.clean import make_cleaner, record_id
from lmcore.data.ingest import ingest_records
from lmcore.data.versions import DataRegistry, split_hint
from lmcore.errors import LmopsError
from lmcore.feedback.store import FeedbackStore

SPLITS = ("train", "holdout", "negative")


@dataclass(frozen=True)
class HarvestResult:
    new_rows: int  # feedback rows claimed by this harvest
    train_records: int  # accepted records with split "train"
    holdout_records: int  # accepted records with split "holdout"
    negatives: int  # accepted records with split "negative"
    quarantined: int  # records the feedback suite rejected (personal data, bounds, ...)
    version: str | None  # dataset version made by the last batch (None: nothing new accepted)
    watermark: int  # last feedback seq harvested
    should_train: bool  # at least feedback.min_new_records new train+holdout records
    skipped_known: int = 0  # records whose text was already in the registry
    batches: int = 0
    pairs: int = 0  # accepted preference pairs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_trainable(meta: str | dict | None) -> bool:
    """True unless a record's meta marks it as feedback ``holdout`` or ``negative``."""
    return split_hint(meta) in (None, "train")


def holdout_score(record_id: str) -> float:
    """A stable number in [0, 1) from a record id: the same id always gets the same split."""
    return int(hashlib.sha256(f"holdout:{record_id}".encode()).hexdigest()[:12], 16) / float(16**12)


def build_records(rows, holdout_fraction: float, data_params=None) -> list[dict]:
    """Feedback rows (``lmcore.feedback.store.FeedbackRow``) -> record dicts for ``ingest_records``."""
    clean = make_cleaner(data_params or DataParams())
    out = []
    for r in rows:
        correction = r.correction if r.correction and r.correction.strip() else None
        reply = correction if correction is not None else r.completion
        text = r.prompt + reply
        rid = record_id(clean(text))
        if correction is None and r.rating < 0:
            split = "negative"
        else:
            split = "holdout" if holdout_score(rid) < holdout_fraction else "train"
        out.append({
            "text": text,
            "source": "feedback",
            "uri": f"feedback://{r.generation_id}",
            "created_at": pd.Timestamp(r.created_at, unit="s", tz="UTC"),
            "meta": {"rating": int(r.rating), "generation_id": r.generation_id, "model_version": r.model_version,
                     "split": split, "corrected": correction is not None, "feedback_seq": int(r.seq),
                     **prompt_boundary(r.prompt, reply, clean)},
            "_id": rid,
        })
    return out


def prompt_boundary(prompt: str, reply: str, clean) -> dict[str, int]:
    """``{"prompt_chars": n}``: where the prompt ends in the record's text once ``clean`` has normalised it
    (so training masks the prompt out of the loss); {} when cleaning moves text across the boundary."""
    mark = "\ue000"  # a private-use character: no normalisation step touches or strips it
    marked = clean(prompt + mark + reply)
    cut = marked.find(mark)
    if cut <= 0 or marked.replace(mark, "", 1) != clean(prompt + reply) or cut >= len(marked) - 1:
        return {}
    return {"prompt_chars": cut}


def pair_text(prompt: str, chosen: str, rejected: str) -> str:
    """The canonical record text of a preference pair."""
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}, ensure_ascii=False)


def preference_pairs(rows) -> list[dict]:
    """(prompt, chosen, rejected, model version of the rejected text) from feedback rows; see the module doc."""
    pairs = []
    ups, downs = defaultdict(list), defaultdict(list)
    for r in rows:
        correction = r.correction if r.correction and r.correction.strip() else None
        if correction is not None and correction != r.completion:
            pairs.append({"prompt": r.prompt, "chosen": correction, "rejected": r.completion,
                          "model_version": r.model_version, "generation_id": r.generation_id, "pair": "correction",
                          "created_at": r.created_at})
        elif correction is None:
            (ups if r.rating > 0 else downs)[r.prompt].append(r)
    for prompt, liked in ups.items():
        for up in liked:
            for down in downs.get(prompt, []):
                if up.completion != down.completion:
                    pairs.append({"prompt": prompt, "chosen": up.completion, "rejected": down.completion,
                                  "model_version": down.model_version, "generation_id": down.generation_id,
                                  "pair": "ratings", "created_at": max(up.created_at, down.created_at)})
    return pairs


def pair_records(rows, holdout_fraction: float) -> list[dict]:
    """Preference pairs as record dicts for ``ingest_records`` (kind ``preference``)."""
    out = []
    for p in preference_pairs(rows):
        text = pair_text(p["prompt"], p["chosen"], p["rejected"])
        split = "holdout" if holdout_score(record_id(text)) < holdout_fraction else "train"
        out.append({"text": text, "source": "feedback", "uri": f"feedback://{p['generation_id']}",
                    "created_at": pd.Timestamp(p["created_at"], unit="s", tz="UTC"),
                    "meta": {"model_version": p["model_version"], "generation_id": p["generation_id"],
                             "pair": p["pair"], "split": split}})
    return out


def read_pairs(registry, version: str | None = None) -> list[dict]:
    """The preference pairs of a dataset version (default: current), with their meta."""
    df = registry.read(version, kinds=("preference",))
    out = []
    for text, meta in zip(df["text"], df["meta"], strict=True):
        try:
            pair, info = json.loads(text), json.loads(meta or "{}")
        except ValueError:
            continue
        out.append({**pair, "model_version": info.get("model_version"), "split": info.get("split"),
                    "pair": info.get("pair")})
    return out


def harvest(settings, params, *, registry=None, store=None) -> HarvestResult:
    """Claim new feedback, turn it into records, validate and version them; see the module doc."""
    own_store = store is None
    store = store or FeedbackStore(settings.feedback_db)
    registry = registry or DataRegistry.open(settings)
    counts = dict.fromkeys(SPLITS, 0)
    new_rows = quarantined = skipped = batches = n_pairs = 0
    version = None
    try:
        for _ in range(10_000):  # bounded: each pass claims a batch or stops
            claim = store.claim()
            if claim is None:
                break
            batches += 1
            new_rows += len(claim.rows)
            records = build_records(claim.rows, params.feedback.holdout_fraction, params.data)
            if not records:  # rows whose generation vanished: nothing to ingest
                store.finish_claim(claim.batch_id, None)
                continue
            try:
                known = registry.known_ids()
                pairs = pair_records(claim.rows, params.feedback.holdout_fraction)  # first: the feedback shard
                paired = ingest_records(pd.DataFrame(pairs), kind="preference", suite="preference", params=params.data,
                                        registry=registry, source="feedback") if pairs else None  # makes the version
                res = ingest_records(pd.DataFrame([{k: v for k, v in r.items() if k != "_id"} for r in records]),
                                     kind="feedback", suite="feedback", params=params.data, registry=registry,
                                     source="feedback")
                bad_ids: set[str] = set()
                if res.quarantine_path:
                    q = pd.read_parquet(res.quarantine_path, columns=["id", "reasons"])
                    dup_only = q["reasons"].astype(str) == "expect_column_values_to_be_in_set(duplicate)"
                    bad_ids = set(q.loc[~dup_only, "id"].astype(str))  # a duplicate's first copy was accepted
            except BaseException as e:
                store.fail_claim(claim.batch_id, str(e) or type(e).__name__)
                if isinstance(e, LmopsError):
                    raise LmopsError(f"harvest failed (rows kept for the next harvest): {e}") from None
                raise
            store.finish_claim(claim.batch_id, res.version)
            quarantined += res.quarantined
            skipped += res.skipped_known
            version = res.version or (paired.version if paired else None) or version
            if paired:
                n_pairs += paired.accepted
                quarantined += paired.quarantined
            seen: set[str] = set()
            for r in records:
                rid = r["_id"]
                if rid in known or rid in bad_ids or rid in seen:
                    continue
                seen.add(rid)
                counts[r["meta"]["split"]] += 1
        watermark = store.watermark()
    finally:
        if own_store:
            store.close()
    fresh = counts["train"] + counts["holdout"]
    return HarvestResult(
        new_rows=new_rows, train_records=counts["train"], holdout_records=counts["holdout"],
        negatives=counts["negative"], quarantined=quarantined, version=version, watermark=watermark,
        should_train=new_rows > 0 and fresh >= params.feedback.min_new_records, skipped_known=skipped,
        batches=batches, pairs=n_pairs,
    )

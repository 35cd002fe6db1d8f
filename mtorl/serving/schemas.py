"""HTTP request/response models of the Serve endpoints and request preprocessing. No Ray, no torch.

A request is turned into model inputs with the checkpoint's manifest only, exactly as the data pipeline
does for training (``mtorl.data.windows``): step features are put in ``manifest.step_features`` order,
user features in ``manifest.user_features`` order, the state is ``normalise_state(q, f, manifest)`` and
the reward of each logged step is ``compute_reward(gain, cost, manifest)``.

Input rules (every violation is a ``RequestError`` whose ``detail`` starts with the field's path,
e.g. ``users[0].journey[3].features.foo: unknown feature ...``):

* ``channel`` must be in the manifest's channel vocabulary.
* ``features`` / ``next_features`` are ``{name: value}`` over ``step_features``; ``user_features`` over the
  manifest's ``user_features``. Unknown names are rejected; every numeric feature is required. One-hot
  columns of categorical features (``column=value``) may be left out: absent means 0, as for a value
  unseen in training.
* Types are strict: numbers are JSON numbers (a string ``"1.5"`` or a boolean is refused, never coerced),
  names and ids are JSON strings.
* Values are finite and within float32 range (the model computes in float32): JSON ``NaN``/``Infinity``,
  ``1e39`` and ``1e308`` are refused, and so is a value whose *normalised* state is not finite in float32;
  ``cost >= 0``.
* ``1 <= len(journey) <= max_journey_length``; ``1 <= len(users) <= max_users_per_request``; user ids unique.

Cost of a channel for a user (used by both endpoints' channel-level module and by allocation): the
user's most recent logged cost for that channel in the request's journey, else the manifest's mean cost
of that channel when the manifest records one (``channel_cost_mean``: a list per channel or a
``{channel: mean}`` dict), else 1.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from itertools import chain
from typing import Annotated, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtorl.data.manifest import Manifest
from mtorl.data.windows import Journey, compute_reward, normalise_state

FLOAT32_MAX = float(np.finfo(np.float32).max)


FLOAT32_RANGE_MSG = "outside the float32 range the model computes in (|x| <= 3.4e38)"

# A finite JSON number within float32 range (strict: no string or boolean is coerced). Native bounds, so
# pydantic-core checks them without calling back into Python for every number.
Number = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
NonNegative = Annotated[float, Field(allow_inf_nan=False, ge=0, le=FLOAT32_MAX)]  # (a field's own ge= would lose to Number's)
Features = dict[str, Number]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StepIn(_In):
    """One logged step of a user's journey (time order)."""

    channel: str = Field(description="Channel shown at this step (a name from the model's channel list).")
    gain: Number = Field(description="Logged gain g_t (e.g. 1 for a conversion).")
    cost: NonNegative = Field(description="Logged cost w_t of the exposure (cost units, >= 0).")
    features: Features = Field(default_factory=dict, description="Step features by name (the model's step_features).")


class UserIn(_In):
    user_id: str = Field(min_length=1, max_length=256)
    journey: list[StepIn] = Field(description="The user's logged steps, oldest first (at least one).")
    next_features: Features | None = Field(None, description="Step features of the coming opportunity; default: the last step's.")
    user_features: Features | None = Field(None, description="Static user features by name (the model's user_features).")


class RecommendRequest(_In):
    users: list[UserIn]


class AllocateRequest(RecommendRequest):
    budget: NonNegative = Field(description="Budget in cost units; the spend never exceeds it.")
    penalty: NonNegative | None = Field(None, description="A floor on the penalty s (default 0); s itself is solved from the budget.")


class UserRecommendation(BaseModel):
    user_id: str
    channel_probs: dict[str, float] = Field(description="Policy pi(c | history) for the next step.")
    recommended_channel: str = Field(description="The decision layer's channel (mtorl.evaluation.decision): argmax_c of the reward head minus s * cost_c among the channels the logs support (the checkpoint's decision: block; s = its fixed penalty, 0 by default).")
    predicted_reward: dict[str, float] = Field(description="Predicted reward of every channel for the next step.")
    expected_reward: float = Field(description="Predicted reward of the recommended channel.")
    cost: float = Field(description="Cost of the recommended channel for this user.")


class RecommendResponse(BaseModel):
    model_version: str
    users: list[UserRecommendation]


class AllocatedUser(BaseModel):
    user_id: str
    channel: str
    expected_reward: float
    value: float = Field(description="q_c - s * cost_c of the served channel (q: the decision layer's pessimistic reward estimate): positive for the users served at s.")
    cost: float


class AllocateResponse(BaseModel):
    model_version: str
    budget: float
    penalty: float = Field(description="The penalty s used: the smallest that fits the budget (the budget's Lagrange multiplier), at least the request's penalty.")
    selected: list[AllocatedUser] = Field(description="Chosen users, best value per cost first.")
    total_expected_reward: float
    spend: float = Field(description="Sum of the selected costs; never above the budget.")
    multiplier: float = Field(description="Lagrange multiplier of the budget constraint.")
    n_users: int


# ------------------------------------------------------------------------------------------ errors

class RequestError(ValueError):
    """Bad input. ``status`` is the HTTP status; ``detail`` is ``"<field path>: <reason>"``."""

    def __init__(self, field: str, message: str, status: int = 422):
        self.field, self.message, self.status = field, message, status
        super().__init__(self.detail)

    @property
    def detail(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def field_path(loc: Iterable[Any]) -> str:
    """pydantic ``loc`` -> ``users[0].journey[3].features.foo`` (a leading ``body`` is dropped)."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not out and p == "body":
            continue
        else:
            out += ("." if out else "") + str(p)
    return out


def validation_detail(err: ValidationError, limit: int = 5) -> str:
    """One line naming each failing field (at most ``limit``)."""
    parts = []
    for e in err.errors()[:limit]:
        path = field_path(e.get("loc", ()))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        bound = (e.get("ctx") or {}).get("le", (e.get("ctx") or {}).get("ge"))
        if isinstance(bound, float) and abs(bound) == FLOAT32_MAX:
            msg = f"{e.get('input')!r} is {FLOAT32_RANGE_MSG}"
        parts.append(f"{path or 'body'}: {msg}")
    more = len(err.errors()) - limit
    return "; ".join(parts) + (f"; ... {more} more" if more > 0 else "")


def parse_request(model: type[BaseModel], obj: Any) -> Any:
    """Validate a decoded JSON body; ``RequestError`` (422) names the first failing fields."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise RequestError("", validation_detail(e)) from None


def parse_body(model: type[BaseModel], body: bytes | str) -> Any:
    """Parse and validate a raw JSON body in one pass (pydantic-core's JSON parser: no intermediate dicts).
    Not JSON -> ``RequestError`` 400 (``body: not valid JSON ...``); invalid -> 422 naming the fields."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errs = e.errors()
        if errs and errs[0].get("type") == "json_invalid":
            raise RequestError("body", f"not valid JSON ({str(errs[0].get('msg', ''))[:200]})", status=400) from None
        raise RequestError("", validation_detail(e)) from None
    except (ValueError, RecursionError) as e:  # e.g. not UTF-8
        raise RequestError("body", f"not valid JSON ({str(e)[:200]})", status=400) from None


# ------------------------------------------------------------------------------------------ preprocessing

_CHANNEL, _FEATURES = operator.attrgetter("channel"), operator.attrgetter("features")
_GAIN, _COST = operator.attrgetter("gain"), operator.attrgetter("cost")


@dataclass(frozen=True)
class Limits:
    max_users: int = 1000
    max_journey_length: int = 512


@dataclass
class Prepared:
    """Model inputs of one request's B users (C channels, D state features)."""

    user_ids: list[str]
    journeys: list[Journey]      # normalised states, rewards from the manifest
    next_states: np.ndarray      # (B, D) normalised state of the coming step
    costs: np.ndarray            # (B, C) cost of each channel for each user

    def __len__(self) -> int:
        return len(self.user_ids)


class Preprocessor:
    """Requests -> model inputs, with the checkpoint's manifest as the only source of preprocessing."""

    def __init__(self, manifest: Manifest, limits: Limits = Limits()):
        self.manifest = manifest
        self.limits = limits
        self.channels: list[str] = list(manifest.channels)
        self.channel_index = {c: i for i, c in enumerate(self.channels)}
        self.step_features: list[str] = list(manifest.step_features)
        self.user_features: list[str] = list(manifest.user_features)
        onehot = manifest.onehot_features
        self.optional_step = {f for f in self.step_features if f in onehot}
        self.default_cost = self._default_costs(manifest)  # (C,)
        self._index = {id(names): {n: i for i, n in enumerate(names)} for names in (self.step_features, self.user_features)}
        self._step_set = frozenset(self.step_features)
        # a step's features in step_features order, as a tuple (itemgetter returns a bare value for one name)
        self._step_values: Callable[[Mapping[str, float]], tuple[float, ...]] = (
            operator.itemgetter(*self.step_features) if len(self.step_features) > 1
            else (lambda f, n=self.step_features[0]: (f[n],)) if self.step_features else (lambda f: ()))
        mean, std = manifest.normalization.mean, manifest.normalization.std
        self._mean, self._std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)  # (D,)

    def _default_costs(self, manifest: Manifest) -> np.ndarray:
        c = len(self.channels)
        rec = manifest.channel_cost_mean
        out = np.ones(c, dtype=np.float64)
        if isinstance(rec, Mapping):
            for name, v in rec.items():
                if name in self.channel_index and v is not None and math.isfinite(float(v)) and float(v) >= 0:
                    out[self.channel_index[name]] = float(v)
        elif isinstance(rec, Sequence) and len(rec) == c:
            for i, v in enumerate(rec):
                if v is not None and math.isfinite(float(v)) and float(v) >= 0:
                    out[i] = float(v)
        return out

    # -- feature vectors
    def _vector(self, given: Mapping[str, float] | None, names: list[str], optional: set[str], where: str,
                what: str) -> np.ndarray:
        given = given or {}
        index = self._index.get(id(names)) or {n: i for i, n in enumerate(names)}
        for k in given:
            if k not in index:
                hint = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "none"
                raise RequestError(f"{where}.{k}", f"unknown {what} (the model's {what}s: {hint})")
        missing = [n for n in names if n not in given and n not in optional]
        if missing:
            need = len(names) - len(optional)
            raise RequestError(where, f"wrong {what} count: got {len(given)}, the model needs {need} "
                                      f"(missing: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''})")
        v = np.zeros(len(names), dtype=np.float64)
        for k, x in given.items():
            v[index[k]] = float(x)
        return v

    def user(self, i: int, u: UserIn) -> tuple[Journey, np.ndarray, np.ndarray]:
        """One user -> (journey, next state (D,), channel costs (C,))."""
        where = f"users[{i}]"
        T = len(u.journey)
        if T == 0:
            raise RequestError(f"{where}.journey", "empty journey: at least one logged step is needed")
        if T > self.limits.max_journey_length:
            raise RequestError(f"{where}.journey", f"{T} steps, the limit is {self.limits.max_journey_length} "
                                                   "(max_journey_length): send the most recent steps")
        ch = np.empty(T, dtype=np.int64)
        rows: list[Any] = []  # (T, Dq) raw step features
        names, exact = self.step_features, self._step_set
        for t, s in enumerate(u.journey):
            c = self.channel_index.get(s.channel)
            if c is None:
                raise RequestError(f"{where}.journey[{t}].channel",
                                   f"unknown channel {s.channel!r} (the model's channels: {', '.join(self.channels)})")
            ch[t] = c
            feats = s.features
            if feats.keys() == exact:  # every feature named once: nothing to check or default
                rows.append([feats[n] for n in names])
            else:
                rows.append(self._vector(feats, names, self.optional_step, f"{where}.journey[{t}].features", "feature"))
        q = np.array(rows, dtype=np.float64).reshape(T, len(names))
        f = self._vector(u.user_features, self.user_features, set(), f"{where}.user_features", "user feature")  # (Df,)
        gain = np.array([s.gain for s in u.journey], dtype=np.float32)
        cost = np.array([s.cost for s in u.journey], dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below, naming the field
            state = normalise_state(q, f, self.manifest)                               # (T, D)
        self._check_finite(state, f"{where}.journey", "features", f"{where}.user_features")
        if u.next_features is None:
            nxt = state[-1]
        else:
            qn = self._vector(u.next_features, self.step_features, self.optional_step, f"{where}.next_features", "feature")
            with np.errstate(over="ignore", invalid="ignore"):
                nxt = normalise_state(qn[None, :], f, self.manifest)[0]                # (D,)
            self._check_finite(nxt[None, :], f"{where}.next_features", None, f"{where}.user_features")
        reward = compute_reward(gain, cost, self.manifest)                             # (T,)
        if not np.isfinite(reward).all():
            t = int(np.flatnonzero(~np.isfinite(reward))[0])
            raise RequestError(f"{where}.journey[{t}].gain", "gain and cost give a reward that is not finite")
        journey = Journey(user_id=u.user_id, channel=ch, gain=gain, cost=cost,
                          propensity=np.full(T, np.nan, dtype=np.float32), state=state, reward=reward)
        costs = self.default_cost.copy()
        seen, last = np.unique(ch[::-1], return_index=True)  # the most recent logged cost of each channel wins
        costs[seen] = cost[::-1][last]
        return journey, nxt, costs

    def _check_finite(self, state: np.ndarray, steps: str, sub: str | None, user: str) -> None:
        """state (T, D) float32: a value that is in range but not after normalisation ((x - mean) / std with a
        small std) would make the model's output NaN for every user batched with it; name its field."""
        bad = ~np.isfinite(state)
        if not bad.any():
            return
        t, d = (int(x) for x in np.argwhere(bad)[0])
        nq = len(self.step_features)
        if d < nq:
            field = f"{steps}[{t}].{sub}.{self.step_features[d]}" if sub else f"{steps}.{self.step_features[d]}"
        else:
            field = f"{user}.{self.user_features[d - nq]}"
        raise RequestError(field, "out of range: its normalised value is not finite in float32 (far outside the "
                                  "training data's range)")

    def prepare(self, users: Sequence[UserIn]) -> Prepared:
        if not users:
            raise RequestError("users", "at least one user is needed")
        if len(users) > self.limits.max_users:
            raise RequestError("users", f"{len(users)} users, the limit is {self.limits.max_users} (max_users_per_request)")
        seen: dict[str, int] = {}
        for i, u in enumerate(users):
            if u.user_id in seen:
                raise RequestError(f"users[{i}].user_id", f"duplicate user_id {u.user_id!r} (also users[{seen[u.user_id]}])")
            seen[u.user_id] = i
        fast = self._prepare_batch(users)
        if fast is not None:
            return fast
        # Some user is refused: the per-user path finds the first one and names its field.
        out = [self.user(i, u) for i, u in enumerate(users)]
        return Prepared(user_ids=[u.user_id for u in users], journeys=[o[0] for o in out],
                        next_states=np.stack([o[1] for o in out]).astype(np.float32),
                        costs=np.stack([o[2] for o in out]))

    def _prepare_batch(self, users: Sequence[UserIn]) -> Prepared | None:
        """``prepare`` over all the users' N steps at once (numpy over (N, D) instead of a loop per user), with
        the same arithmetic as ``user``, so the same values to the bit; None when any user would be refused
        (then ``user``, one by one, raises the error that names the field)."""
        B = len(users)
        lengths = np.fromiter((len(u.journey) for u in users), dtype=np.int64, count=B)   # (B,)
        if lengths.min() == 0 or lengths.max() > self.limits.max_journey_length:
            return None
        steps = [s for u in users for s in u.journey]                                     # N
        N = len(steps)
        try:
            ch = np.fromiter(map(self.channel_index.__getitem__, map(_CHANNEL, steps)), dtype=np.int64, count=N)  # (N,)
        except KeyError:
            return None
        names, exact, Dq, Df = self.step_features, self._step_set, len(self.step_features), len(self.user_features)
        feats = list(map(_FEATURES, steps))
        try:
            if all(f.keys() == exact for f in feats):  # every feature named once: no defaults to fill in
                q = np.fromiter(chain.from_iterable(map(self._step_values, feats)), dtype=np.float64,
                                count=N * Dq).reshape(N, Dq)                                     # (N, Dq)
            else:
                q = np.array([self._vector(f, names, self.optional_step, "", "feature") for f in feats],
                             dtype=np.float64).reshape(N, Dq)
            fu = np.array([self._vector(u.user_features, self.user_features, set(), "", "user feature")
                           for u in users], dtype=np.float64).reshape(B, Df)                    # (B, Df)
        except RequestError:
            return None
        gain = np.fromiter(map(_GAIN, steps), dtype=np.float32, count=N)                    # (N,)
        cost = np.fromiter(map(_COST, steps), dtype=np.float32, count=N)                    # (N,)
        mean, std = self._mean, self._std                                                   # (D,)
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.concatenate([q, np.repeat(fu, lengths, axis=0)], axis=1)                # (N, D)
            if x.shape[1] != mean.shape[0]:
                return None  # (normalise_state, in ``user``, says what is wrong with the manifest)
            state = ((x - mean) / std).astype(np.float32)                                  # (N, D)
        reward = compute_reward(gain, cost, self.manifest)                                  # (N,)
        if not (np.isfinite(state).all() and np.isfinite(reward).all()):
            return None
        ends = np.cumsum(lengths)                                                           # (B,)
        starts = ends - lengths
        nxt = state[ends - 1]                                                               # (B, D) the last step's
        given = [b for b, u in enumerate(users) if u.next_features is not None]
        if given:
            try:
                qn = np.array([self._vector(users[b].next_features, names, self.optional_step, "", "feature")
                               for b in given], dtype=np.float64).reshape(len(given), len(names))
            except RequestError:
                return None
            with np.errstate(over="ignore", invalid="ignore"):
                xn = np.concatenate([qn, fu[given]], axis=1)
                sn = ((xn - mean) / std).astype(np.float32)                                # (G, D)
            if not np.isfinite(sn).all():
                return None
            nxt[given] = sn
        C = len(self.channels)
        costs = np.tile(self.default_cost, (B, 1))                                          # (B, C)
        key = np.repeat(np.arange(B, dtype=np.int64), lengths) * C + ch                    # (N,) user, channel
        seen, first = np.unique(key[::-1], return_index=True)  # the most recent logged cost of each channel wins
        costs.reshape(-1)[seen] = cost[::-1][first]
        prop = np.full(N, np.nan, dtype=np.float32)
        journeys = [Journey(user_id=u.user_id, channel=ch[a:e], gain=gain[a:e], cost=cost[a:e], propensity=prop[a:e],
                            state=state[a:e], reward=reward[a:e])
                    for u, a, e in zip(users, starts.tolist(), ends.tolist())]
        return Prepared(user_ids=[u.user_id for u in users], journeys=journeys, next_states=nxt, costs=costs)


# ------------------------------------------------------------------------------------------ responses

def recommend_scores(probs: np.ndarray, reward: np.ndarray, costs: np.ndarray,
                     decision: Any = None, reward_std: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The decision layer's channel (``evaluation.decision.decide`` at the fixed penalty s of the
    checkpoint's ``decision:`` block, 0 by default): probs, reward, costs (B, C), reward_std (B, C) an
    ensemble's spread (None: a single model) -> (recommended channel (B,), its cost (B,)). Rows are
    independent, so one call can score the users of many requests."""
    from mtorl.evaluation.decision import decide

    d = decide(reward, probs, costs, decision, penalty=float(getattr(decision, "penalty", None) or 0.0),
               reward_std=reward_std)
    return d.channel, d.cost


def recommendations(p: Prepared, probs: np.ndarray, reward: np.ndarray, channels: Sequence[str],
                    scored: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """probs (B, C), reward (B, C) -> per-user recommendations (``recommend_scores``; ``scored`` passes
    them in when already computed for a larger batch)."""
    best, kb = scored if scored is not None else recommend_scores(probs, reward, p.costs)
    # one tolist() per array (Python floats of the same values) instead of a float() per element
    rows = zip(p.user_ids, probs.tolist(), reward.tolist(), np.asarray(best).tolist(), np.asarray(kb, dtype=np.float64).tolist())
    return [{"user_id": uid, "channel_probs": dict(zip(channels, pr)), "recommended_channel": channels[c],
             "predicted_reward": dict(zip(channels, rw)), "expected_reward": rw[c], "cost": k}
            for uid, pr, rw, c, k in rows]


def allocation(p: Prepared, probs: np.ndarray, reward: np.ndarray, channels: Sequence[str], budget: float,
               penalty: float | None, decision: Any = None, reward_std: np.ndarray | None = None) -> dict[str, Any]:
    """The offline evaluation's allocation code (``allocate_requests``, the decision layer of the
    checkpoint's ``decision:`` block) on one request's users. ``penalty`` (the request's) is a floor on s;
    the response's ``penalty`` and ``multiplier`` are the s actually used (the budget's Lagrange multiplier).
    ``reward_std`` (B, C): an ensemble's spread of ``reward`` (None: a single model)."""
    from mtorl.evaluation.allocation import allocate_requests

    users = [(uid, reward[b], probs[b], p.costs[b]) for b, uid in enumerate(p.user_ids)]
    res = allocate_requests(users, budget=budget, penalty=penalty, channels=list(channels), decision=decision,
                            reward_std=reward_std)
    res["selected"] = [{k: s[k] for k in ("user_id", "channel", "expected_reward", "value", "cost")} for s in res["selected"]]
    res.update(budget=float(budget), n_users=len(p.user_ids))
    return res

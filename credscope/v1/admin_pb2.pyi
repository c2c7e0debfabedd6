import datetime

from credscope.v1 import scoring_pb2 as _scoring_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_FREE: _ClassVar[Tier]
    TIER_PRO: _ClassVar[Tier]
    TIER_ENTERPRISE: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_FREE: Tier
TIER_PRO: Tier
TIER_ENTERPRISE: Tier

class ApiKey(_message.Message):
    __slots__ = ("key_id", "name", "tier", "admin", "created_at", "revoked_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    name: str
    tier: Tier
    admin: bool
    created_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., name: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., admin: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("name", "tier", "admin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: Tier
    admin: bool
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., admin: _Optional[bool] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "api_key")
    KEY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    api_key: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("include_revoked",)
    INCLUDE_REVOKED_FIELD_NUMBER: _ClassVar[int]
    include_revoked: bool
    def __init__(self, include_revoked: _Optional[bool] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class GetApiKeyStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "active_keys", "revoked_keys", "calls_24h", "rate_limited_24h", "limit_per_hour")
    TIER_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_KEYS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_KEYS_FIELD_NUMBER: _ClassVar[int]
    CALLS_24H_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITED_24H_FIELD_NUMBER: _ClassVar[int]
    LIMIT_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    active_keys: int
    revoked_keys: int
    calls_24h: int
    rate_limited_24h: int
    limit_per_hour: int
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., active_keys: _Optional[int] = ..., revoked_keys: _Optional[int] = ..., calls_24h: _Optional[int] = ..., rate_limited_24h: _Optional[int] = ..., limit_per_hour: _Optional[int] = ...) -> None: ...

class GetApiKeyStatsResponse(_message.Message):
    __slots__ = ("tiers",)
    TIERS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ...) -> None: ...

class ClearCacheRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClearCacheResponse(_message.Message):
    __slots__ = ("predictions_removed", "explanations_removed")
    PREDICTIONS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    predictions_removed: int
    explanations_removed: int
    def __init__(self, predictions_removed: _Optional[int] = ..., explanations_removed: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("start_time", "end_time")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LabelCount(_message.Message):
    __slots__ = ("label", "count")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    label: str
    count: int
    def __init__(self, label: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("total_predictions", "by_decision", "by_risk_level", "mean_probability", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "cache_hit_rate", "error_calls", "challenger")
    TOTAL_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    BY_DECISION_FIELD_NUMBER: _ClassVar[int]
    BY_RISK_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MEAN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CALLS_FIELD_NUMBER: _ClassVar[int]
    CHALLENGER_FIELD_NUMBER: _ClassVar[int]
    total_predictions: int
    by_decision: _containers.RepeatedCompositeFieldContainer[LabelCount]
    by_risk_level: _containers.RepeatedCompositeFieldContainer[LabelCount]
    mean_probability: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    cache_hit_rate: float
    error_calls: int
    challenger: ChallengerComparison
    def __init__(self, total_predictions: _Optional[int] = ..., by_decision: _Optional[_Iterable[_Union[LabelCount, _Mapping]]] = ..., by_risk_level: _Optional[_Iterable[_Union[LabelCount, _Mapping]]] = ..., mean_probability: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p95_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., cache_hit_rate: _Optional[float] = ..., error_calls: _Optional[int] = ..., challenger: _Optional[_Union[ChallengerComparison, _Mapping]] = ...) -> None: ...

class ChallengerComparison(_message.Message):
    __slots__ = ("challenger_version", "compared", "agreement_rate", "approval_rate_difference", "champion_auc", "challenger_auc")
    CHALLENGER_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_RATE_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_RATE_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    CHAMPION_AUC_FIELD_NUMBER: _ClassVar[int]
    CHALLENGER_AUC_FIELD_NUMBER: _ClassVar[int]
    challenger_version: str
    compared: int
    agreement_rate: float
    approval_rate_difference: float
    champion_auc: float
    challenger_auc: float
    def __init__(self, challenger_version: _Optional[str] = ..., compared: _Optional[int] = ..., agreement_rate: _Optional[float] = ..., approval_rate_difference: _Optional[float] = ..., champion_auc: _Optional[float] = ..., challenger_auc: _Optional[float] = ...) -> None: ...

class ListTopFeaturesRequest(_message.Message):
    __slots__ = ("decision", "limit")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    decision: _scoring_pb2.Decision
    limit: int
    def __init__(self, decision: _Optional[_Union[_scoring_pb2.Decision, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class FeatureImportance(_message.Message):
    __slots__ = ("feature", "mean_abs_shap", "count")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_SHAP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    feature: str
    mean_abs_shap: float
    count: int
    def __init__(self, feature: _Optional[str] = ..., mean_abs_shap: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class ListTopFeaturesResponse(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureImportance]
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureImportance, _Mapping]]] = ...) -> None: ...

class ReplayDecisionRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReplayDecisionResponse(_message.Message):
    __slots__ = ("request_id", "model_version", "recorded_probability", "replayed_probability", "recorded_decision", "replayed_decision", "recorded_reason_codes", "replayed_reason_codes", "identical")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDED_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    RECORDED_DECISION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_DECISION_FIELD_NUMBER: _ClassVar[int]
    RECORDED_REASON_CODES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_REASON_CODES_FIELD_NUMBER: _ClassVar[int]
    IDENTICAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_version: str
    recorded_probability: float
    replayed_probability: float
    recorded_decision: _scoring_pb2.Decision
    replayed_decision: _scoring_pb2.Decision
    recorded_reason_codes: _containers.RepeatedScalarFieldContainer[str]
    replayed_reason_codes: _containers.RepeatedScalarFieldContainer[str]
    identical: bool
    def __init__(self, request_id: _Optional[str] = ..., model_version: _Optional[str] = ..., recorded_probability: _Optional[float] = ..., replayed_probability: _Optional[float] = ..., recorded_decision: _Optional[_Union[_scoring_pb2.Decision, str]] = ..., replayed_decision: _Optional[_Union[_scoring_pb2.Decision, str]] = ..., recorded_reason_codes: _Optional[_Iterable[str]] = ..., replayed_reason_codes: _Optional[_Iterable[str]] = ..., identical: _Optional[bool] = ...) -> None: ...

class ActivateModelRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ActivateModelResponse(_message.Message):
    __slots__ = ("previous_version", "active_version")
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    previous_version: str
    active_version: str
    def __init__(self, previous_version: _Optional[str] = ..., active_version: _Optional[str] = ...) -> None: ...

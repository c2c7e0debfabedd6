import datetime

from credscope.v1 import applicant_pb2 as _applicant_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_APPROVE: _ClassVar[Decision]
    DECISION_REVIEW: _ClassVar[Decision]
    DECISION_REJECT: _ClassVar[Decision]

class RiskLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RISK_LEVEL_UNSPECIFIED: _ClassVar[RiskLevel]
    RISK_LEVEL_VERY_LOW: _ClassVar[RiskLevel]
    RISK_LEVEL_LOW: _ClassVar[RiskLevel]
    RISK_LEVEL_MEDIUM: _ClassVar[RiskLevel]
    RISK_LEVEL_HIGH: _ClassVar[RiskLevel]
    RISK_LEVEL_VERY_HIGH: _ClassVar[RiskLevel]

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_INCREASES_RISK: _ClassVar[Direction]
    DIRECTION_DECREASES_RISK: _ClassVar[Direction]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_DEFAULTED: _ClassVar[Outcome]
    OUTCOME_REPAID: _ClassVar[Outcome]
DECISION_UNSPECIFIED: Decision
DECISION_APPROVE: Decision
DECISION_REVIEW: Decision
DECISION_REJECT: Decision
RISK_LEVEL_UNSPECIFIED: RiskLevel
RISK_LEVEL_VERY_LOW: RiskLevel
RISK_LEVEL_LOW: RiskLevel
RISK_LEVEL_MEDIUM: RiskLevel
RISK_LEVEL_HIGH: RiskLevel
RISK_LEVEL_VERY_HIGH: RiskLevel
DIRECTION_UNSPECIFIED: Direction
DIRECTION_INCREASES_RISK: Direction
DIRECTION_DECREASES_RISK: Direction
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_DEFAULTED: Outcome
OUTCOME_REPAID: Outcome

class ExplainOptions(_message.Message):
    __slots__ = ("enabled", "top_k")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    top_k: int
    def __init__(self, enabled: _Optional[bool] = ..., top_k: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("applicant", "request_id", "explain")
    APPLICANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    applicant: _applicant_pb2.Applicant
    request_id: str
    explain: ExplainOptions
    def __init__(self, applicant: _Optional[_Union[_applicant_pb2.Applicant, _Mapping]] = ..., request_id: _Optional[str] = ..., explain: _Optional[_Union[ExplainOptions, _Mapping]] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("feature", "value", "shap_value", "direction")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SHAP_VALUE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    feature: str
    value: float
    shap_value: float
    direction: Direction
    def __init__(self, feature: _Optional[str] = ..., value: _Optional[float] = ..., shap_value: _Optional[float] = ..., direction: _Optional[_Union[Direction, str]] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("base_value", "contributions")
    BASE_VALUE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    base_value: float
    contributions: _containers.RepeatedCompositeFieldContainer[FeatureContribution]
    def __init__(self, base_value: _Optional[float] = ..., contributions: _Optional[_Iterable[_Union[FeatureContribution, _Mapping]]] = ...) -> None: ...

class AdverseActionReason(_message.Message):
    __slots__ = ("code", "text")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    code: str
    text: str
    def __init__(self, code: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("default_probability", "decision", "risk_level", "confidence", "model_version", "request_id", "from_cache", "processing_time_ms", "timestamp", "explanation", "reasons")
    DEFAULT_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    RISK_LEVEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    default_probability: float
    decision: Decision
    risk_level: RiskLevel
    confidence: float
    model_version: str
    request_id: str
    from_cache: bool
    processing_time_ms: float
    timestamp: _timestamp_pb2.Timestamp
    explanation: Explanation
    reasons: _containers.RepeatedCompositeFieldContainer[AdverseActionReason]
    def __init__(self, default_probability: _Optional[float] = ..., decision: _Optional[_Union[Decision, str]] = ..., risk_level: _Optional[_Union[RiskLevel, str]] = ..., confidence: _Optional[float] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., from_cache: _Optional[bool] = ..., processing_time_ms: _Optional[float] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ..., reasons: _Optional[_Iterable[_Union[AdverseActionReason, _Mapping]]] = ...) -> None: ...

class LoanParameters(_message.Message):
    __slots__ = ("average_loan_amount", "interest_rate", "term_months", "loss_given_default", "processing_cost", "operating_cost_per_year")
    AVERAGE_LOAN_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    INTEREST_RATE_FIELD_NUMBER: _ClassVar[int]
    TERM_MONTHS_FIELD_NUMBER: _ClassVar[int]
    LOSS_GIVEN_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_COST_FIELD_NUMBER: _ClassVar[int]
    OPERATING_COST_PER_YEAR_FIELD_NUMBER: _ClassVar[int]
    average_loan_amount: float
    interest_rate: float
    term_months: int
    loss_given_default: float
    processing_cost: float
    operating_cost_per_year: float
    def __init__(self, average_loan_amount: _Optional[float] = ..., interest_rate: _Optional[float] = ..., term_months: _Optional[int] = ..., loss_given_default: _Optional[float] = ..., processing_cost: _Optional[float] = ..., operating_cost_per_year: _Optional[float] = ...) -> None: ...

class BatchScoreRequest(_message.Message):
    __slots__ = ("applicants", "request_id", "explain", "loan_parameters")
    APPLICANTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    LOAN_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    applicants: _containers.RepeatedCompositeFieldContainer[_applicant_pb2.Applicant]
    request_id: str
    explain: ExplainOptions
    loan_parameters: LoanParameters
    def __init__(self, applicants: _Optional[_Iterable[_Union[_applicant_pb2.Applicant, _Mapping]]] = ..., request_id: _Optional[str] = ..., explain: _Optional[_Union[ExplainOptions, _Mapping]] = ..., loan_parameters: _Optional[_Union[LoanParameters, _Mapping]] = ...) -> None: ...

class FieldViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ApplicantError(_message.Message):
    __slots__ = ("code", "message", "field_violations")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field_violations: _containers.RepeatedCompositeFieldContainer[FieldViolation]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field_violations: _Optional[_Iterable[_Union[FieldViolation, _Mapping]]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("default_probability", "decision", "risk_level", "confidence", "model_version", "request_id", "from_cache", "explanation", "reasons")
    DEFAULT_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    RISK_LEVEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    default_probability: float
    decision: Decision
    risk_level: RiskLevel
    confidence: float
    model_version: str
    request_id: str
    from_cache: bool
    explanation: Explanation
    reasons: _containers.RepeatedCompositeFieldContainer[AdverseActionReason]
    def __init__(self, default_probability: _Optional[float] = ..., decision: _Optional[_Union[Decision, str]] = ..., risk_level: _Optional[_Union[RiskLevel, str]] = ..., confidence: _Optional[float] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., from_cache: _Optional[bool] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ..., reasons: _Optional[_Iterable[_Union[AdverseActionReason, _Mapping]]] = ...) -> None: ...

class BatchScoreResult(_message.Message):
    __slots__ = ("index", "prediction", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    prediction: Prediction
    error: ApplicantError
    def __init__(self, index: _Optional[int] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., error: _Optional[_Union[ApplicantError, _Mapping]] = ...) -> None: ...

class RiskDistribution(_message.Message):
    __slots__ = ("very_low", "low", "medium", "high", "very_high")
    VERY_LOW_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    MEDIUM_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    VERY_HIGH_FIELD_NUMBER: _ClassVar[int]
    very_low: int
    low: int
    medium: int
    high: int
    very_high: int
    def __init__(self, very_low: _Optional[int] = ..., low: _Optional[int] = ..., medium: _Optional[int] = ..., high: _Optional[int] = ..., very_high: _Optional[int] = ...) -> None: ...

class PortfolioMetrics(_message.Message):
    __slots__ = ("total_applications", "approved", "review", "rejected", "approval_rate", "expected_portfolio_value", "expected_defaults", "expected_default_rate", "risk_distribution", "expected_value_per_approval", "loan_parameters")
    TOTAL_APPLICATIONS_FIELD_NUMBER: _ClassVar[int]
    APPROVED_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_RATE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PORTFOLIO_VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DEFAULT_RATE_FIELD_NUMBER: _ClassVar[int]
    RISK_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VALUE_PER_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    LOAN_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    total_applications: int
    approved: int
    review: int
    rejected: int
    approval_rate: float
    expected_portfolio_value: float
    expected_defaults: float
    expected_default_rate: float
    risk_distribution: RiskDistribution
    expected_value_per_approval: float
    loan_parameters: LoanParameters
    def __init__(self, total_applications: _Optional[int] = ..., approved: _Optional[int] = ..., review: _Optional[int] = ..., rejected: _Optional[int] = ..., approval_rate: _Optional[float] = ..., expected_portfolio_value: _Optional[float] = ..., expected_defaults: _Optional[float] = ..., expected_default_rate: _Optional[float] = ..., risk_distribution: _Optional[_Union[RiskDistribution, _Mapping]] = ..., expected_value_per_approval: _Optional[float] = ..., loan_parameters: _Optional[_Union[LoanParameters, _Mapping]] = ...) -> None: ...

class BatchScoreResponse(_message.Message):
    __slots__ = ("results", "portfolio", "request_id", "model_version", "processing_time_ms", "timestamp")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchScoreResult]
    portfolio: PortfolioMetrics
    request_id: str
    model_version: str
    processing_time_ms: float
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, results: _Optional[_Iterable[_Union[BatchScoreResult, _Mapping]]] = ..., portfolio: _Optional[_Union[PortfolioMetrics, _Mapping]] = ..., request_id: _Optional[str] = ..., model_version: _Optional[str] = ..., processing_time_ms: _Optional[float] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecisionPolicy(_message.Message):
    __slots__ = ("approve_below", "review_below")
    APPROVE_BELOW_FIELD_NUMBER: _ClassVar[int]
    REVIEW_BELOW_FIELD_NUMBER: _ClassVar[int]
    approve_below: float
    review_below: float
    def __init__(self, approve_below: _Optional[float] = ..., review_below: _Optional[float] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "created_at", "active", "roc_auc")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ROC_AUC_FIELD_NUMBER: _ClassVar[int]
    version: str
    created_at: _timestamp_pb2.Timestamp
    active: bool
    roc_auc: float
    def __init__(self, version: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ..., roc_auc: _Optional[float] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_version", "created_at", "input_features", "model_features", "policy", "metrics", "training_source", "versions")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SOURCE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    created_at: _timestamp_pb2.Timestamp
    input_features: _containers.RepeatedScalarFieldContainer[str]
    model_features: _containers.RepeatedScalarFieldContainer[str]
    policy: DecisionPolicy
    metrics: _containers.ScalarMap[str, float]
    training_source: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, model_version: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., input_features: _Optional[_Iterable[str]] = ..., model_features: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[DecisionPolicy, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., training_source: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class ReportOutcomeRequest(_message.Message):
    __slots__ = ("request_id", "outcome", "observed_at")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outcome: Outcome
    observed_at: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., observed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportOutcomeResponse(_message.Message):
    __slots__ = ("request_id", "recorded")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    recorded: bool
    def __init__(self, request_id: _Optional[str] = ..., recorded: _Optional[bool] = ...) -> None: ...

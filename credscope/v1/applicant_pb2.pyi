from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContractType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTRACT_TYPE_UNSPECIFIED: _ClassVar[ContractType]
    CONTRACT_TYPE_CASH_LOANS: _ClassVar[ContractType]
    CONTRACT_TYPE_REVOLVING_LOANS: _ClassVar[ContractType]

class IncomeType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INCOME_TYPE_UNSPECIFIED: _ClassVar[IncomeType]
    INCOME_TYPE_WORKING: _ClassVar[IncomeType]
    INCOME_TYPE_COMMERCIAL_ASSOCIATE: _ClassVar[IncomeType]
    INCOME_TYPE_PENSIONER: _ClassVar[IncomeType]
    INCOME_TYPE_STATE_SERVANT: _ClassVar[IncomeType]
    INCOME_TYPE_UNEMPLOYED: _ClassVar[IncomeType]
    INCOME_TYPE_STUDENT: _ClassVar[IncomeType]
    INCOME_TYPE_BUSINESSMAN: _ClassVar[IncomeType]
    INCOME_TYPE_MATERNITY_LEAVE: _ClassVar[IncomeType]

class EducationType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDUCATION_TYPE_UNSPECIFIED: _ClassVar[EducationType]
    EDUCATION_TYPE_SECONDARY: _ClassVar[EducationType]
    EDUCATION_TYPE_HIGHER: _ClassVar[EducationType]
    EDUCATION_TYPE_INCOMPLETE_HIGHER: _ClassVar[EducationType]
    EDUCATION_TYPE_LOWER_SECONDARY: _ClassVar[EducationType]
    EDUCATION_TYPE_ACADEMIC_DEGREE: _ClassVar[EducationType]

class FamilyStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAMILY_STATUS_UNSPECIFIED: _ClassVar[FamilyStatus]
    FAMILY_STATUS_MARRIED: _ClassVar[FamilyStatus]
    FAMILY_STATUS_SINGLE: _ClassVar[FamilyStatus]
    FAMILY_STATUS_CIVIL_MARRIAGE: _ClassVar[FamilyStatus]
    FAMILY_STATUS_SEPARATED: _ClassVar[FamilyStatus]
    FAMILY_STATUS_WIDOW: _ClassVar[FamilyStatus]

class HousingType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOUSING_TYPE_UNSPECIFIED: _ClassVar[HousingType]
    HOUSING_TYPE_HOUSE_APARTMENT: _ClassVar[HousingType]
    HOUSING_TYPE_WITH_PARENTS: _ClassVar[HousingType]
    HOUSING_TYPE_MUNICIPAL_APARTMENT: _ClassVar[HousingType]
    HOUSING_TYPE_RENTED_APARTMENT: _ClassVar[HousingType]
    HOUSING_TYPE_OFFICE_APARTMENT: _ClassVar[HousingType]
    HOUSING_TYPE_COOP_APARTMENT: _ClassVar[HousingType]
CONTRACT_TYPE_UNSPECIFIED: ContractType
CONTRACT_TYPE_CASH_LOANS: ContractType
CONTRACT_TYPE_REVOLVING_LOANS: ContractType
INCOME_TYPE_UNSPECIFIED: IncomeType
INCOME_TYPE_WORKING: IncomeType
INCOME_TYPE_COMMERCIAL_ASSOCIATE: IncomeType
INCOME_TYPE_PENSIONER: IncomeType
INCOME_TYPE_STATE_SERVANT: IncomeType
INCOME_TYPE_UNEMPLOYED: IncomeType
INCOME_TYPE_STUDENT: IncomeType
INCOME_TYPE_BUSINESSMAN: IncomeType
INCOME_TYPE_MATERNITY_LEAVE: IncomeType
EDUCATION_TYPE_UNSPECIFIED: EducationType
EDUCATION_TYPE_SECONDARY: EducationType
EDUCATION_TYPE_HIGHER: EducationType
EDUCATION_TYPE_INCOMPLETE_HIGHER: EducationType
EDUCATION_TYPE_LOWER_SECONDARY: EducationType
EDUCATION_TYPE_ACADEMIC_DEGREE: EducationType
FAMILY_STATUS_UNSPECIFIED: FamilyStatus
FAMILY_STATUS_MARRIED: FamilyStatus
FAMILY_STATUS_SINGLE: FamilyStatus
FAMILY_STATUS_CIVIL_MARRIAGE: FamilyStatus
FAMILY_STATUS_SEPARATED: FamilyStatus
FAMILY_STATUS_WIDOW: FamilyStatus
HOUSING_TYPE_UNSPECIFIED: HousingType
HOUSING_TYPE_HOUSE_APARTMENT: HousingType
HOUSING_TYPE_WITH_PARENTS: HousingType
HOUSING_TYPE_MUNICIPAL_APARTMENT: HousingType
HOUSING_TYPE_RENTED_APARTMENT: HousingType
HOUSING_TYPE_OFFICE_APARTMENT: HousingType
HOUSING_TYPE_COOP_APARTMENT: HousingType

class Applicant(_message.Message):
    __slots__ = ("name_contract_type", "flag_own_car", "flag_own_realty", "cnt_children", "amt_income_total", "amt_credit", "amt_annuity", "amt_goods_price", "name_income_type", "name_education_type", "name_family_status", "name_housing_type", "region_population_relative", "days_birth", "days_employed", "days_registration", "days_id_publish", "days_last_phone_change", "own_car_age", "cnt_fam_members", "region_rating_client", "region_rating_client_w_city", "ext_source_1", "ext_source_2", "ext_source_3", "obs_30_cnt_social_circle", "def_30_cnt_social_circle", "amt_req_credit_bureau_year")
    NAME_CONTRACT_TYPE_FIELD_NUMBER: _ClassVar[int]
    FLAG_OWN_CAR_FIELD_NUMBER: _ClassVar[int]
    FLAG_OWN_REALTY_FIELD_NUMBER: _ClassVar[int]
    CNT_CHILDREN_FIELD_NUMBER: _ClassVar[int]
    AMT_INCOME_TOTAL_FIELD_NUMBER: _ClassVar[int]
    AMT_CREDIT_FIELD_NUMBER: _ClassVar[int]
    AMT_ANNUITY_FIELD_NUMBER: _ClassVar[int]
    AMT_GOODS_PRICE_FIELD_NUMBER: _ClassVar[int]
    NAME_INCOME_TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_EDUCATION_TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FAMILY_STATUS_FIELD_NUMBER: _ClassVar[int]
    NAME_HOUSING_TYPE_FIELD_NUMBER: _ClassVar[int]
    REGION_POPULATION_RELATIVE_FIELD_NUMBER: _ClassVar[int]
    DAYS_BIRTH_FIELD_NUMBER: _ClassVar[int]
    DAYS_EMPLOYED_FIELD_NUMBER: _ClassVar[int]
    DAYS_REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    DAYS_ID_PUBLISH_FIELD_NUMBER: _ClassVar[int]
    DAYS_LAST_PHONE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    OWN_CAR_AGE_FIELD_NUMBER: _ClassVar[int]
    CNT_FAM_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REGION_RATING_CLIENT_FIELD_NUMBER: _ClassVar[int]
    REGION_RATING_CLIENT_W_CITY_FIELD_NUMBER: _ClassVar[int]
    EXT_SOURCE_1_FIELD_NUMBER: _ClassVar[int]
    EXT_SOURCE_2_FIELD_NUMBER: _ClassVar[int]
    EXT_SOURCE_3_FIELD_NUMBER: _ClassVar[int]
    OBS_30_CNT_SOCIAL_CIRCLE_FIELD_NUMBER: _ClassVar[int]
    DEF_30_CNT_SOCIAL_CIRCLE_FIELD_NUMBER: _ClassVar[int]
    AMT_REQ_CREDIT_BUREAU_YEAR_FIELD_NUMBER: _ClassVar[int]
    name_contract_type: ContractType
    flag_own_car: bool
    flag_own_realty: bool
    cnt_children: int
    amt_income_total: float
    amt_credit: float
    amt_annuity: float
    amt_goods_price: float
    name_income_type: IncomeType
    name_education_type: EducationType
    name_family_status: FamilyStatus
    name_housing_type: HousingType
    region_population_relative: float
    days_birth: int
    days_employed: int
    days_registration: float
    days_id_publish: int
    days_last_phone_change: float
    own_car_age: float
    cnt_fam_members: float
    region_rating_client: int
    region_rating_client_w_city: int
    ext_source_1: float
    ext_source_2: float
    ext_source_3: float
    obs_30_cnt_social_circle: float
    def_30_cnt_social_circle: float
    amt_req_credit_bureau_year: float
    def __init__(self, name_contract_type: _Optional[_Union[ContractType, str]] = ..., flag_own_car: _Optional[bool] = ..., flag_own_realty: _Optional[bool] = ..., cnt_children: _Optional[int] = ..., amt_income_total: _Optional[float] = ..., amt_credit: _Optional[float] = ..., amt_annuity: _Optional[float] = ..., amt_goods_price: _Optional[float] = ..., name_income_type: _Optional[_Union[IncomeType, str]] = ..., name_education_type: _Optional[_Union[EducationType, str]] = ..., name_family_status: _Optional[_Union[FamilyStatus, str]] = ..., name_housing_type: _Optional[_Union[HousingType, str]] = ..., region_population_relative: _Optional[float] = ..., days_birth: _Optional[int] = ..., days_employed: _Optional[int] = ..., days_registration: _Optional[float] = ..., days_id_publish: _Optional[int] = ..., days_last_phone_change: _Optional[float] = ..., own_car_age: _Optional[float] = ..., cnt_fam_members: _Optional[float] = ..., region_rating_client: _Optional[int] = ..., region_rating_client_w_city: _Optional[int] = ..., ext_source_1: _Optional[float] = ..., ext_source_2: _Optional[float] = ..., ext_source_3: _Optional[float] = ..., obs_30_cnt_social_circle: _Optional[float] = ..., def_30_cnt_social_circle: _Optional[float] = ..., amt_req_credit_bureau_year: _Optional[float] = ...) -> None: ...

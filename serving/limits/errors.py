"""Errors of the guardrails, as subclasses of the gateway's one error tree (serving/errors.py):

RateLimited (429, rate_limit_error)
├── RateLimitExceeded (429, code rate_limit_exceeded)  requests or tokens per minute
└── QuotaExceeded     (429, insufficient_quota)        the budget cannot hold the worst case
InvalidRequest (400)
├── ContextLengthExceeded (400, context_length_exceeded)  prompt over the tenant's maximum
├── MaxTokensExceeded     (400, max_tokens_exceeded)      max_tokens over the tenant's maximum
├── RequestShapeError     (400, invalid_json_shape)       too deep / too many fields
├── RequestTimeout        (408, request_timeout)          head or body not received in time
└── HeadersTooLarge       (431, headers_too_large)        request head over gateway.max_header_bytes
PermissionDenied (403)
└── ModelNotPriced        (403, model_not_priced)         money budget, model has no price
ServiceUnavailable (503)
└── LimitsUnavailable     (503, limits_unavailable)       Redis down and failing closed
"""

from __future__ import annotations

from serving.errors import InvalidRequest, PermissionDenied, RateLimited, ServiceUnavailable


class RateLimitExceeded(RateLimited):
    code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class MaxTokensExceeded(InvalidRequest):
    code = "max_tokens_exceeded"


class RequestShapeError(InvalidRequest):
    code = "invalid_json_shape"


class RequestTimeout(InvalidRequest):
    status_code = 408
    code = "request_timeout"


class HeadersTooLarge(InvalidRequest):
    status_code = 431
    code = "headers_too_large"


class ModelNotPriced(PermissionDenied):
    code = "model_not_priced"


class LimitsUnavailable(ServiceUnavailable):
    code = "limits_unavailable"

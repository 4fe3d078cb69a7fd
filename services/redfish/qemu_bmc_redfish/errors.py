"""Redfish errors (DMTF DSP0266 §9.6 "Error responses") with Base message registry MessageIds."""

from __future__ import annotations

from typing import Any

BASE_REGISTRY = "Base.1.22"

#: MessageId → (severity, message with %1.. for its arguments, resolution). Our wording; the ids and
#: arguments are the Base registry's.
MESSAGES: dict[str, tuple[str, str, str]] = {
    "Success": ("OK", "The request completed successfully.", "None."),
    "GeneralError": ("Critical", "The request failed: %1", "See the message; retry later if it persists."),
    "ResourceNotFound": ("Critical", "There is no %1 named %2.", "Use a URI from a collection or link."),
    "ResourceMissingAtURI": ("Critical", "There is no resource at %1.", "Use a URI from a collection or link."),
    "MalformedJSON": ("Critical", "The request body is not valid JSON.", "Send a valid JSON object."),
    "PropertyUnknown": ("Warning", "The property %1 is not known here.", "Remove it from the request."),
    "PropertyNotWritable": ("Warning", "The property %1 cannot be changed.", "Remove it from the request."),
    "PropertyValueNotInList": ("Warning", "The value %1 is not allowed for %2.",
                               "Use one of the property's allowable values."),
    "PropertyValueTypeError": ("Warning", "The value %1 has the wrong type for %2.",
                               "Send a value of the property's type."),
    "PropertyMissing": ("Warning", "The property %1 is required.", "Add it to the request."),
    "ActionParameterMissing": ("Critical", "The action %1 needs the parameter %2.", "Add the parameter."),
    "ActionParameterUnknown": ("Warning", "The action %1 has no parameter %2.", "Remove the parameter."),
    "ActionParameterValueNotInList": ("Warning", "The value %1 of parameter %2 is not allowed for action %3.",
                                      "Use one of the parameter's allowable values."),
    "ActionParameterValueTypeError": ("Warning", "The value %1 of parameter %2 of action %3 has the wrong type.",
                                      "Send a value of the parameter's type."),
    "ActionParameterValueError": ("Warning", "The value of parameter %1 of action %2 is not valid.",
                                  "Correct the value (see the other messages) and retry."),
    "ActionParameterNotSupported": ("Warning", "The parameter %1 of action %2 is not supported here.",
                                    "Remove the parameter (the action's ActionInfo lists those supported)."),
    "ActionNotSupported": ("Critical", "The action %1 is not supported here.", "Use an action the resource lists."),
    "InsufficientPrivilege": ("Critical", "Your role does not allow this request.",
                              "Use an account with a role that allows it."),
    "NoValidSession": ("Critical", "There is no valid session or credentials for this request.",
                       "Log in (POST /redfish/v1/SessionService/Sessions) or use Basic authentication."),
    "PasswordChangeRequired": ("Critical", "This account must change its password before anything else: PATCH "
                               "the Password of the account at %1.", "PATCH a new Password to that account."),
    "PreconditionFailed": ("Critical", "The ETag in If-Match does not match the resource.",
                           "GET the resource again and retry with its ETag."),
    "OperationNotAllowed": ("Critical", "The operation is not allowed on this resource.", "None."),
    "ResourceAlreadyExists": ("Critical", "A %1 with %2 %3 exists already.", "Use another value."),
    "CreateFailedMissingReqProperties": ("Critical", "The resource was not created: %1 is required.",
                                         "Add the property and retry."),
    "ResourceCannotBeDeleted": ("Critical", "This resource cannot be deleted.", "None."),
    "ResourceInUse": ("Warning", "The resource is in use or changing: it cannot be changed now.",
                      "Wait for the change under way (see the other messages), then retry."),
    "ResourceExhaustion": ("Critical", "%1 has not got what the request needs.",
                           "Ask for less, or free what the other messages name, and retry."),
    "PropertyValueIncorrect": ("Warning", "The value %2 of %1 is not acceptable here.",
                               "See the other messages for why; change the value and retry."),
    "PropertyValueFormatError": ("Warning", "The value %1 of %2 does not have the form the property needs.",
                                 "Send a value of the property's form."),
    "PropertyValueConflict": ("Warning", "%1 cannot be set: it conflicts with the value of %2.",
                              "Send values that agree."),
    "PropertyValueOutOfRange": ("Warning", "The value %1 of %2 is out of the range the property takes.",
                                "Send a value in the property's range."),
    "ArraySizeTooLong": ("Warning", "The array %1 has more than %2 elements.", "Send fewer elements."),
    "PropertyValueResourceConflict": ("Warning", "%1 cannot be set to %2: it conflicts with the state of %3.",
                                      "Change the state of that resource first."),
    "CreateLimitReachedForResource": ("Critical", "No more resources of this kind can be created.",
                                      "Delete one first."),
    "NoOperation": ("Warning", "The request body holds nothing to change; nothing was changed.",
                    "Send the properties to change."),
    "HeaderInvalid": ("Critical", "The request header %1 is not valid.", "Send a valid header."),
    "QueryParameterUnsupported": ("Warning", "The query parameter %1 is not supported.",
                                  "Send the request without it."),
    "QueryParameterValueFormatError": ("Warning", "The value '%1' of the query parameter %2 does not have its form.",
                                       "Correct the value and send the request again."),
    "QueryParameterValueTypeError": ("Warning", "The value '%1' of the query parameter %2 is not of its type.",
                                     "Correct the value and send the request again."),
    "QueryParameterOutOfRange": ("Warning", "The value '%1' of the query parameter %2 is out of range: %3.",
                                 "Send a value in the range."),
    "QueryNotSupportedOnResource": ("Warning", "This query parameter does not apply to this resource.",
                                    "Send the request without it (e.g. $filter, $top, $skip and only are for "
                                    "collections)."),
    "QueryNotSupportedOnOperation": ("Warning", "Query parameters apply to GET and HEAD only.",
                                     "Send the request without them."),
    "QueryCombinationInvalid": ("Warning", "These query parameters cannot be used together.",
                                "Send each parameter once, and only alone."),
    "PasswordIncorrectLength": ("Critical", "The password is shorter or longer than the account policy allows "
                                "(AccountService MinPasswordLength, MaxPasswordLength).", "Choose another password."),
    "SessionLimitExceeded": ("Critical", "No session was made: the service, or this user, has as many open sessions "
                             "as it allows.", "Log out of sessions no longer used (DELETE them), then retry."),
    "PayloadTooLarge": ("Critical", "The request body is larger than the service takes.",
                        "Send a smaller body (the service's max_body_bytes, 1 MiB by default)."),
    "ServiceTemporarilyUnavailable": ("Critical", "The service cannot handle the request now; retry after %1 s.",
                                      "Retry later."),
}


def message(message_id: str, *args: Any) -> dict[str, Any]:
    severity, text, resolution = MESSAGES[message_id]
    for number, arg in enumerate(args, 1):
        text = text.replace(f"%{number}", str(arg))
    return {"@odata.type": "#Message.v1_1_2.Message", "MessageId": f"{BASE_REGISTRY}.{message_id}",
            "Message": text, "MessageArgs": [str(arg) for arg in args], "MessageSeverity": severity,
            "Resolution": resolution}


class RedfishError(Exception):
    """Ends a request with ``status`` and a Redfish error body."""

    def __init__(self, status: int, message_id: str, *args: Any, headers: dict[str, str] | None = None,
                 extra: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message_id)
        self.status, self.message_id, self.args_, self.headers = status, message_id, args, headers or {}
        self.extra = extra or []

    def body(self) -> dict[str, Any]:
        info = message(self.message_id, *self.args_)
        return {"error": {"code": info["MessageId"], "message": info["Message"],
                          "@Message.ExtendedInfo": [info, *self.extra]}}


def not_found(kind: str, name: str) -> RedfishError:
    return RedfishError(404, "ResourceNotFound", kind, name)

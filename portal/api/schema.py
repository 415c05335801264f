"""OpenAPI additions: the endpoints that are not DRF views, and every error answer.

The image upload is a raw ASGI app (vault.upload) and the download an async
Django view (vault.download); both stream, so DRF cannot describe them itself.
"""
ERROR = {"$ref": "#/components/schemas/Error"}
ERROR_SHAPE = {"type": "object", "required": ["error", "detail"], "properties": {
    "error": {"type": "string"}, "detail": {}}}
TEXT = {"type": "string", "maxLength": 200}


def meta_headers():
    """What vault.upload.parse_metadata accepts, so a request the schema allows is stored."""
    from vault.upload import INT_FIELDS  # the vault imports portal, not the reverse

    def count(field):
        return {"type": "integer", "minimum": 1, "maximum": INT_FIELDS[field]}

    return [
        ("X-Berth-Name", True, "image name",
         {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"}),
        ("X-Berth-Guest-UUID", False, "guest identity", {"type": "string", "format": "uuid"}),
        ("X-Berth-Guest-Name", False, "guest name", TEXT),
        ("X-Berth-Source-Host", False, "host the image was saved on", TEXT),
        ("X-Berth-Memory-MiB", False, "guest memory", count("memory_mib")),
        ("X-Berth-VCPUs", False, "guest vCPUs", count("vcpus")),
        ("X-Berth-Architecture", False, "e.g. x86_64", TEXT),
        ("X-Berth-Virt-Extensions", False, "e.g. vmx", TEXT),
        ("X-Berth-SHA256", False, "expected SHA-256 of the body; mismatch → 422, nothing "
         "stored", {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}),
    ]


def _errors(*codes):
    return {str(code): {"description": "refused", "content": {
        "application/json": {"schema": ERROR}}} for code in codes}


def add_streaming_endpoints(result, generator, request, public):
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("Error", ERROR_SHAPE)
    images = result["paths"].setdefault("/api/v1/images/", {})
    images["post"] = {
        "operationId": "images_upload",
        "summary": "Upload an image (streamed; encrypted as it arrives)",
        "tags": ["images"],
        "parameters": [{"in": "header", "name": name, "required": required,
                        "schema": schema, "description": text}
                       for name, required, text, schema in meta_headers()],
        "requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"201": {"description": "stored", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/SavedImage"}}}},
            **_errors(400, 401, 403, 409, 413, 415, 422, 500, 507)},
        "security": [{"knoxApiToken": []}, {"cookieAuth": []}],
    }
    result["paths"]["/api/v1/images/{id}/content"] = {"get": {
        "operationId": "images_content",
        "summary": "Download an image's plaintext (each chunk verified before it is sent)",
        "tags": ["images"],
        "parameters": [
            {"in": "path", "name": "id", "required": True,
             "schema": {"type": "string", "format": "uuid"}},
            {"in": "header", "name": "Range", "required": False,
             "schema": {"type": "string"}, "description": "a single range: bytes=START-END"}],
        "responses": {
            "200": {"description": "the whole image", "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "206": {"description": "the requested range", "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            **_errors(401, 403, 404, 416)},
        "security": [{"knoxApiToken": []}, {"cookieAuth": []}],
    }}
    return result


METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def declare_error_responses(result, generator, request, public):
    """Every operation's error answers, in the one error shape (portal.api.errors).

    401, 403 and 429 everywhere (every call is authenticated, checked and rate-limited);
    404 where the path names an object or a list is paged (a page past the end); 400
    where a body or query filters are validated. An error a view declares without a body
    gets the error shape too. Runs after ``add_streaming_endpoints``.
    """
    result.setdefault("components", {}).setdefault("schemas", {}).setdefault(
        "Error", ERROR_SHAPE)
    for path, operations in result["paths"].items():
        for method, operation in operations.items():
            if method in METHODS:
                _declare_errors(path, operation)
    return result


def _declare_errors(path, operation):
    query = [p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"]
    codes = {401: "not authenticated", 403: "not allowed (role, scope or second factor)",
             429: "too many requests (Retry-After says when to retry)"}
    if "{" in path or "page" in query:
        codes[404] = "no such object, or a page past the end"
    if "requestBody" in operation or set(query) - {"page"}:
        codes[400] = "invalid input (the detail names the field)"
    responses = operation.setdefault("responses", {})
    for code, text in codes.items():
        responses.setdefault(str(code), {"description": text})
    for code, response in responses.items():
        if code[0] in "45" and "content" not in response:
            response["content"] = {"application/json": {"schema": ERROR}}

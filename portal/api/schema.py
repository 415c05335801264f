"""OpenAPI additions for the endpoints that are not DRF views.

The image upload is a raw ASGI app (vault.upload) and the download an async
Django view (vault.download); both stream, so DRF cannot describe them itself.
"""
ERROR = {"$ref": "#/components/schemas/Error"}
META_HEADERS = [
    ("X-Berth-Name", True, "image name"),
    ("X-Berth-Guest-UUID", False, "guest identity"),
    ("X-Berth-Guest-Name", False, "guest name"),
    ("X-Berth-Source-Host", False, "host the image was saved on"),
    ("X-Berth-Memory-MiB", False, "guest memory"),
    ("X-Berth-VCPUs", False, "guest vCPUs"),
    ("X-Berth-Architecture", False, "e.g. x86_64"),
    ("X-Berth-Virt-Extensions", False, "e.g. vmx"),
    ("X-Berth-SHA256", False, "expected SHA-256 of the body; mismatch → 422, nothing stored"),
]


def _errors(*codes):
    return {str(code): {"description": "refused", "content": {
        "application/json": {"schema": ERROR}}} for code in codes}


def add_streaming_endpoints(result, generator, request, public):
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = {"type": "object", "required": ["error", "detail"], "properties": {
        "error": {"type": "string"}, "detail": {}}}
    images = result["paths"].setdefault("/api/v1/images/", {})
    images["post"] = {
        "operationId": "images_upload",
        "summary": "Upload an image (streamed; encrypted as it arrives)",
        "tags": ["images"],
        "parameters": [{"in": "header", "name": name, "required": required,
                        "schema": {"type": "string"}, "description": text}
                       for name, required, text in META_HEADERS],
        "requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"201": {"description": "stored", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/SavedImage"}}}},
            **_errors(400, 401, 403, 413, 415, 422)},
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

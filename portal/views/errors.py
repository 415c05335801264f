"""Error pages: a message, never a traceback; JSON for the API."""
from django.http import JsonResponse
from django.shortcuts import render


def _wants_json(request):
    return request.path.startswith("/api/")


def forbidden(request, exception=None):
    reason = str(exception) if exception and str(exception) else "You may not do this."
    if _wants_json(request):
        return JsonResponse({"error": "permission_denied", "detail": reason}, status=403)
    return render(request, "errors/403.html", {"reason": reason}, status=403)


def not_found(request, exception=None):
    if _wants_json(request):
        return JsonResponse({"error": "not_found", "detail": "Not found."}, status=404)
    return render(request, "errors/404.html", status=404)


def server_error(request):
    if _wants_json(request):
        return JsonResponse({"error": "server_error", "detail": "Internal error."}, status=500)
    return render(request, "errors/500.html", status=500)

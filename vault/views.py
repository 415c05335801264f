"""Vault pages."""
from django.shortcuts import render

from portal.roles import reader_required


@reader_required
def image_list(request):
    return render(request, "vault/list.html", {"images": []})

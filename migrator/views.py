"""Jobs pages."""
from django.shortcuts import render

from portal.roles import reader_required


@reader_required
def job_list(request):
    return render(request, "migrator/jobs.html", {"jobs": []})

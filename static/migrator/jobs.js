// The jobs list: rows update live; new jobs appear on the next load.
(function () {
  "use strict";
  var root = document.getElementById("jobs-live");
  if (!root) return;
  function show(job) {
    var row = root.querySelector('tr[data-job="' + job.id + '"]');
    if (!row) return;
    var state = row.querySelector('[data-field="state"]');
    state.textContent = job.state;
    state.className = "badge state-" + job.state;
    row.querySelector('[data-field="stage"]').textContent = job.stage;
    row.querySelector('[data-field="percent"]').textContent = job.percent + " %";
  }
  window.BerthLive(root.dataset.socket, function (event) {
    if (event.type === "snapshot") event.jobs.forEach(show);
    else if (event.job) show(event.job);
  }, document.getElementById("live-status"));
})();

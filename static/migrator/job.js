// The job page: progress bar, stage, timeline and outcome, live.
(function () {
  "use strict";
  var root = document.getElementById("job-live");
  if (!root) return;
  var bar = document.querySelector("#job-progress > span");
  var best = 0;
  // Final states only: "unknown" (the portal gave up while the agent was away) is
  // not one - its agent's report or an admin settles it, and the page waits on.
  var FINAL = ["succeeded", "failed", "aborted"];
  var served = document.getElementById("job-state").textContent.trim();
  // Served already finished, the page has its result links: reloading it would loop.
  var servedFinal = FINAL.indexOf(served) >= 0;
  function mib(n) { return (n / 1048576).toFixed(1) + " MiB"; }
  function show(job) {
    if (job.id !== root.dataset.job) return;
    document.getElementById("job-state").textContent = job.state;
    document.getElementById("job-state").className = "badge state-" + job.state;
    document.getElementById("job-stage").textContent = job.stage || "—";
    best = Math.max(best, job.percent);  // the bar never runs backwards
    bar.style.width = best + "%";
    document.getElementById("job-progress").setAttribute("aria-valuenow", String(best));
    document.getElementById("job-bytes").textContent = mib(job.done_bytes) + " of " + mib(job.total_bytes);
    var error = document.getElementById("job-error");
    error.hidden = !job.error;
    error.textContent = job.error || "";
    var list = document.getElementById("job-timeline");
    list.replaceChildren.apply(list, job.timeline.map(function (step) {
      var li = document.createElement("li");
      li.textContent = step.stage + " ";
      var at = document.createElement("span");
      at.className = "muted";
      at.textContent = step.at;
      li.appendChild(at);
      return li;
    }));
    var chart = document.getElementById("rounds-chart");
    if (chart && window.BerthChart) window.BerthChart.draw(chart, job.rounds || []);
    var final = document.getElementById("migration-final");
    if (final && job.result && job.result.total_time_s !== undefined) {
      final.replaceChildren();
      [["total time", job.result.total_time_s + " s"], ["downtime", job.result.downtime_ms + " ms"],
       ["bytes sent", job.result.bytes_sent + " (" + job.result.bytes_ratio + " × memory)"],
       ["rounds", job.result.rounds], ["stop-and-copy because", job.result.stop_reason],
       ["commit check", job.result.verify],
       ["bandwidth cap", job.result.max_bandwidth_mbps === undefined ? undefined
         : job.result.max_bandwidth_mbps ? job.result.max_bandwidth_mbps + " MB/s" : "none"],
       ["CPU throttle", job.result.throttle === undefined ? undefined
         : Math.round(job.result.throttle * 100) + " %"]]
        .filter(function (row) { return row[1] !== undefined && row[1] !== null; })
        .forEach(function (row) {
          var dt = document.createElement("dt"); dt.textContent = row[0];
          var dd = document.createElement("dd"); dd.textContent = String(row[1]);
          final.appendChild(dt); final.appendChild(dd);
        });
    }
    // An outcome the agent reported after the job had ended is drawn by the
    // server too: reload once when one arrives.
    if (job.result && job.result.late_report && !document.getElementById("job-late-report")
        && !root.dataset.lateReloaded) {
      root.dataset.lateReloaded = "1";
      setTimeout(function () { location.reload(); }, 800);
    }
    // A migration in doubt: its panel (answers, decision, admin form) is drawn
    // by the server; reload once whenever the resolution moves on.
    var resolution = (job.resolution && job.resolution.state) || "";
    if (resolution !== (root.dataset.resolution || "") && root.dataset.reloadedFor !== resolution) {
      root.dataset.reloadedFor = resolution;
      setTimeout(function () { location.reload(); }, 800);
    }
    // Unknown, or settled from unknown: the server draws why and the settle form.
    if ((job.state === "unknown") !== (served === "unknown") && !root.dataset.unknownReloaded) {
      root.dataset.unknownReloaded = "1";
      setTimeout(function () { location.reload(); }, 800);
    }
    if (FINAL.indexOf(job.state) >= 0 || job.state === "in_doubt" || job.state === "unknown") {
      var abort = document.getElementById("abort-form");
      if (abort) abort.hidden = true;
      if (job.state === "succeeded" && !servedFinal && !root.dataset.reloaded) {
        root.dataset.reloaded = "1";
        setTimeout(function () { location.reload(); }, 800);  // show the result links
      }
    }
  }
  window.BerthLive(root.dataset.socket, function (event) {
    if (event.type === "snapshot") event.jobs.forEach(show);
    else if (event.job) show(event.job);
  }, document.getElementById("live-status"));
})();

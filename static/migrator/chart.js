// The chart of rounds, drawn as inline SVG from the job's `rounds` (no library, no CDN).
window.BerthChart = (function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  function el(name, attrs, text) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function draw(svg, rounds) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    if (!rounds.length) {
      svg.appendChild(el("text", {x: 10, y: 20}, "No rounds yet."));
      return;
    }
    var W = 600, H = 240, left = 50, right = 50, top = 10, bottom = 30;
    var plotW = W - left - right, plotH = H - top - bottom;
    var maxDirty = Math.max.apply(null, rounds.map(function (r) { return r.dirty_pages || 0; }).concat([1]));
    var maxBw = Math.max.apply(null, rounds.map(function (r) { return r.bandwidth_mbps || 0; }).concat([1]));
    var step = plotW / rounds.length;
    var points = [];
    rounds.forEach(function (r, i) {
      var h = plotH * (r.dirty_pages || 0) / maxDirty;
      var width = Math.min(step * 0.7, 48);  // one round must not fill the chart
      var bar = el("rect", {"class": "bar", x: left + i * step + (step - width) / 2,
                            y: top + plotH - h, width: width, height: h});
      bar.appendChild(el("title", {}, "round " + r.round + ": " + r.dirty_pages + " dirty pages, " +
                         (r.bandwidth_mbps || 0).toFixed(1) + " MB/s"));
      svg.appendChild(bar);
      svg.appendChild(el("text", {x: left + i * step + step / 2 - 4, y: H - 12}, String(r.round)));
      points.push((left + i * step + step / 2) + "," + (top + plotH - plotH * (r.bandwidth_mbps || 0) / maxBw));
    });
    svg.appendChild(el("polyline", {"class": "line", points: points.join(" ")}));
    points.forEach(function (p) {  // a marker per round, visible even for a single round
      var xy = p.split(",");
      svg.appendChild(el("circle", {"class": "point", cx: xy[0], cy: xy[1], r: 4}));
    });
    svg.appendChild(el("text", {x: 2, y: top + 10}, String(maxDirty)));
    svg.appendChild(el("text", {x: 2, y: top + plotH}, "0"));
    svg.appendChild(el("text", {x: W - right + 4, y: top + 10}, maxBw.toFixed(0) + " MB/s"));
    svg.appendChild(el("text", {x: left, y: H - 1}, "round"));
  }
  return {draw: draw};
})();

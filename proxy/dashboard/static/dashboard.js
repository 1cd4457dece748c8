// The dashboard's charts: each <figure data-chart> holds its spec as JSON (series with their own
// days, vertical marks such as the sunset, shaded bands such as brownouts); uPlot draws it.
(function () {
  "use strict";
  var COLOURS = { v2: "#e8590c", v3: "#2f9e44", projected: "#868e96" };
  var HEIGHT = 280;

  function seconds(when) {  // an epoch in seconds, or an ISO date
    return typeof when === "number" ? when : Date.parse(when) / 1000;
  }

  // the union of the series' days, each series given null where it has no value
  function align(series) {
    var xs = [];
    var seen = {};
    series.forEach(function (s) { s.x.forEach(function (x) { if (!seen[x]) { seen[x] = true; xs.push(x); } }); });
    xs.sort(function (a, b) { return a - b; });
    var data = [xs];
    series.forEach(function (s) {
      var at = {};
      s.x.forEach(function (x, i) { at[x] = s.y[i]; });
      data.push(xs.map(function (x) { return x in at ? at[x] : null; }));
    });
    return data;
  }

  function drawMarks(spec) {
    return function (u) {
      var ctx = u.ctx, box = u.bbox, px = devicePixelRatio || 1;
      ctx.save();
      ctx.beginPath();
      ctx.rect(box.left, box.top, box.width, box.height);
      ctx.clip();
      (spec.bands || []).forEach(function (band) {
        var x0 = u.valToPos(seconds(band.start), "x", true), x1 = u.valToPos(seconds(band.end), "x", true);
        ctx.fillStyle = "rgba(201, 42, 42, 0.18)";
        ctx.fillRect(x0, box.top, Math.max(x1 - x0, 2 * px), box.height);
      });
      (spec.marks || []).forEach(function (mark) {
        var x = u.valToPos(seconds(mark.at), "x", true);
        ctx.strokeStyle = "#c92a2a";
        ctx.lineWidth = 2 * px;
        ctx.setLineDash([6 * px, 4 * px]);
        ctx.beginPath();
        ctx.moveTo(x, box.top);
        ctx.lineTo(x, box.top + box.height);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.fillStyle = "#c92a2a";
        ctx.font = (12 * px) + "px sans-serif";
        ctx.textAlign = "right";
        ctx.fillText(mark.label, x - 4 * px, box.top + 14 * px);
      });
      ctx.restore();
    };
  }

  function chart(figure) {
    var spec = JSON.parse(figure.querySelector("script[type='application/json']").textContent);
    // the x range covers the marks and bands too (a sunset past the last day is still shown)
    spec.series.forEach(function (s) { s.x = s.x.slice(); });
    var extra = (spec.marks || []).map(function (m) { return seconds(m.at); });
    (spec.bands || []).forEach(function (b) { extra.push(seconds(b.start), seconds(b.end)); });
    var data = align(spec.series);
    var xs = data[0];
    var min = Math.min.apply(null, xs.concat(extra)), max = Math.max.apply(null, xs.concat(extra));
    var opts = {
      width: figure.clientWidth,
      height: HEIGHT,
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); },
      scales: { x: { time: true, range: function () { return min === max ? [min - 86400, max + 86400] : [min, max]; } },
                y: { range: function (u, lo, hi) { return [0, Math.max(1, hi * 1.1)]; } } },
      series: [{}].concat(spec.series.map(function (s) {
        return { label: s.label, stroke: COLOURS[s.color], width: 2, dash: s.dash ? [8, 6] : undefined,
                 fill: s.color === "projected" ? undefined : COLOURS[s.color] + "22", spanGaps: false,
                 points: { show: !!s.points || xs.length < 40 } };
      })),
      axes: [{}, { label: "calls per day", size: 60 }],
      hooks: { draw: [drawMarks(spec)] },
    };
    var plot = new uPlot(opts, data, figure);
    window.addEventListener("resize", function () { plot.setSize({ width: figure.clientWidth, height: HEIGHT }); });
  }

  document.querySelectorAll("figure[data-chart]").forEach(chart);
})();

// Widths from data attributes: the CSP allows no inline style attributes.
document.querySelectorAll(".js-width").forEach(function (el) {
  el.style.width = Math.min(100, Number(el.dataset.width) || 0) + "%";
});

// carwash-jobs dashboard: live refresh and confirmations, in plain JS (no build step, no libraries).
"use strict";

// An element with data-refresh="URL" has its contents replaced by the HTML fragment that URL
// returns, every data-interval milliseconds, until the fragment holds a [data-final] marker
// (a job that has ended). A session that ran out sends the page to the login.
function liveRefresh(element) {
  const url = element.dataset.refresh;
  const interval = Number(element.dataset.interval || 3000);
  const schedule = () => window.setTimeout(tick, interval);

  async function tick() {
    if (!document.hidden) {
      try {
        const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
        if (response.redirected && new URL(response.url).pathname === "/ui/login") {
          window.location.assign(response.url);
          return;
        }
        if (response.ok) {
          element.innerHTML = await response.text();
        }
      } catch (error) {
        // the server is away for a moment: try again at the next tick
      }
    }
    if (!element.querySelector("[data-final]")) {
      schedule();
    }
  }

  if (!element.querySelector("[data-final]")) {
    schedule();
  }
}

// A form with data-confirm="question" is sent only after the user confirms. Listening on the
// document also covers forms that a refresh put on the page later.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
  }
});

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(liveRefresh);
});

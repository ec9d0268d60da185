"""The PaperCut-compatible XML-RPC API, called with the standard library's ``xmlrpc.client``.

The API listens on a real loopback port (in this process, over a real SQLite store with
its thread pools), and every call is made from a thread with ``xmlrpc.client``, as a
PaperCut script would make it: each method, the token refused when wrong, faults with
clear messages and never a stack trace, changes that reach the change log and the audit
log. One test runs a real ``twistd`` primary with the token in a file.
"""

from __future__ import annotations

import http.client
import os
import xmlrpc.client
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from sitesrv.core.auth import FailureThrottle
from sitesrv.server import StartupError
from sitesrv.store import Store
from sitesrv.store.audit import thdListAudit
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.changelog import thdChangesSince, thdState
from sitesrv.store.ledger import thdListTransactions
from sitesrv.store.users import (
    thdAddCard,
    thdAddGroup,
    thdAddUser,
    thdGroupsOf,
    thdUser,
)
from sitesrv.web import xmlrpc as api
from tests.inprocess import TRACEBACK, get, make_server
from tests.processes import (
    ServerProcess,
    tls_init,
    twistd_unavailable,
    wait_for_health,
    write_primary_config,
)
from tests.support import NOW, sqlite_url

reactor: Any = _reactor

TOKEN = "s3cret-token-for-tests-0123456789"
PATH = "/rpc/api/xmlrpc"


def proxy(url: str) -> xmlrpc.client.ServerProxy:
    """A client as PaperCut's examples make one."""
    return xmlrpc.client.ServerProxy(url)


class Listener:
    """A web ``Site`` on a loopback port whose connections a test can close at its end."""

    def __init__(self, root: Resource) -> None:
        self.factory = WrappingFactory(Site(root))
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")

    def url(self, path: str) -> str:
        """The URL of ``path`` on this listener."""
        return f"http://127.0.0.1:{self.port.getHost().port}{path}"

    async def close(self) -> None:
        """Stop listening, abort the connections still open and wait for them to go."""
        await self.port.stopListening()
        for protocol in list(self.factory.protocols):
            protocol.transport.abortConnection()
        while self.factory.protocols:
            await deferLater(reactor, 0.01, lambda: None)


class APIBase(TestCase):
    """The API on a loopback port over a primary store "hq" with alice, bob and a group.

    alice: 5.00, card 1001, full name "Alice Example". bob: 0.20. Group "staff".
    """

    timeout = 30

    def setUp(self) -> None:
        self.store: Store = open_store(sqlite_url(self))
        write = self.store.write
        write(thdInitPrimary, "hq", "USD", 2, NOW)
        write(thdAddUser, "alice", NOW, full_name="Alice Example", email="a@x.org", balance=500)
        write(thdAddCard, "alice", "1001", NOW)
        write(thdAddUser, "bob", NOW, balance=20)
        write(thdAddGroup, "staff", NOW)
        self.store.start(reactor)
        self.addCleanup(self.store.stop)
        self.throttle_clock = Clock()
        self.api = api.PaperCutAPI(
            TOKEN,
            self.store.runRead,
            self.store.runWrite,
            reactor,
            "hq",
            throttle=FailureThrottle(self.throttle_clock),
        )
        root = Resource()
        api.mount(root, self.api)
        self.listener = Listener(root)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.listener.close()))
        self.url = self.listener.url(PATH)

    def call(self, method: str, *args: Any) -> Deferred[Any]:
        """``proxy.api.<method>(*args)`` from a thread; the token is not added."""

        def blocking() -> Any:
            client = proxy(self.url)
            try:
                return getattr(client, method)(*args)
            finally:
                client("close")()

        return deferToThread(blocking)

    def api_call(self, method: str, *args: Any) -> Deferred[Any]:
        """``api.<method>(TOKEN, *args)``."""
        return self.call(f"api.{method}", TOKEN, *args)

    async def fault(self, method: str, *args: Any, token: str = TOKEN) -> xmlrpc.client.Fault:
        """The fault ``api.<method>(token, *args)`` answers (failing if it does not)."""
        try:
            result = await self.call(f"api.{method}", token, *args)
        except xmlrpc.client.Fault as fault:
            self.assertNotIn(TRACEBACK, fault.faultString)
            self.assertNotIn('File "', fault.faultString)
            return fault
        self.fail(f"api.{method} answered {result!r}, not a fault")

    def post(self, body: bytes, method: str = "POST", path: str = PATH) -> Deferred[Any]:
        """A raw HTTP request from a thread: (status, body)."""

        def blocking() -> tuple[int, bytes]:
            port = self.listener.port.getHost().port
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request(method, path, body=body, headers={"Content-Type": "text/xml"})
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        return deferToThread(blocking)

    def audit(self) -> list[tuple[str, str, str]]:
        """(actor, action, target) of the audit log, oldest first."""
        return [(e.actor, e.action, e.target) for e in reversed(self.store.read(thdListAudit))]

    def changed_tables(self, after: int) -> set[str]:
        """Tables with change-log entries after ``after`` (what replicates to sites)."""
        changes, _upto, _limited = self.store.read(thdChangesSince, after, 1000)
        return {c.table for c in changes}

    def head(self) -> int:
        """The change log's head."""
        return int(self.store.read(thdState)[1])


class ReadTests(APIBase):
    """Methods that only read."""

    async def test_isUserExists(self) -> None:
        """True for a user, False for anyone else."""
        self.assertIs(await self.api_call("isUserExists", "alice"), True)
        self.assertIs(await self.api_call("isUserExists", "nobody"), False)

    async def test_getUserAccountBalance(self) -> None:
        """A float in currency units; accountName "" (or left out) is the personal one."""
        self.assertEqual(await self.api_call("getUserAccountBalance", "alice", ""), 5.0)
        self.assertEqual(await self.api_call("getUserAccountBalance", "bob"), 0.2)
        fault = await self.fault("getUserAccountBalance", "nobody", "")
        self.assertEqual(fault.faultCode, api.FAULT_NOT_FOUND)
        self.assertEqual(fault.faultString, "no user named 'nobody'")
        fault = await self.fault("getUserAccountBalance", "alice", "Faculty")
        self.assertEqual(fault.faultCode, api.FAULT_INVALID)
        self.assertIn("one personal account per user", fault.faultString)

    async def test_getUserProperty(self) -> None:
        """Properties as strings, as PaperCut gives them."""
        expected = {
            "full-name": "Alice Example",
            "email": "a@x.org",
            "balance": "5.00",
            "disabled": "false",
            "disabled-print": "false",
            "restricted": "true",
        }
        for prop, value in expected.items():
            self.assertEqual(await self.api_call("getUserProperty", "alice", prop), value, prop)
        fault = await self.fault("getUserProperty", "alice", "office")
        self.assertEqual(fault.faultCode, api.FAULT_INVALID)
        self.assertIn("unknown user property 'office'", fault.faultString)
        self.assertIn("full-name", fault.faultString)
        fault = await self.fault("getUserProperty", "nobody", "email")
        self.assertEqual(fault.faultString, "no user named 'nobody'")

    async def test_listUserAccounts(self) -> None:
        """Usernames in order, paged by offset and limit (at most 1000)."""
        self.assertEqual(await self.api_call("listUserAccounts", 0, 1000), ["alice", "bob"])
        self.assertEqual(await self.api_call("listUserAccounts", 1, 5), ["bob"])
        self.assertEqual(await self.api_call("listUserAccounts", 2, 5), [])
        for args, message in (
            ((0, 1001), "limit must be from 0 to 1000"),
            ((-1, 10), "offset must not be negative"),
            ((0, True), "limit must be an integer"),
            (("0", 10), "offset must be an integer"),
        ):
            fault = await self.fault("listUserAccounts", *args)
            self.assertEqual((fault.faultCode, fault.faultString), (api.FAULT_INVALID, message))

    async def test_lookUpUserNameByCardNo(self) -> None:
        """The holder's username, normalised as card readers' numbers are; "" for none."""
        self.assertEqual(await self.api_call("lookUpUserNameByCardNo", "1001"), "alice")
        self.assertEqual(await self.api_call("lookUpUserNameByCardNo", " 1001\n"), "alice")
        self.assertEqual(await self.api_call("lookUpUserNameByCardNo", "9999"), "")
        self.assertEqual(await self.api_call("lookUpUserNameByCardNo", ""), "")


class WriteTests(APIBase):
    """Methods that change data: change-logged (they replicate) and audited."""

    async def test_adjustUserAccountBalance(self) -> None:
        """Credit and debit in currency units, exact to the cent."""
        head = self.head()
        self.assertIs(
            await self.api_call("adjustUserAccountBalance", "alice", 1.25, "top-up", ""), True
        )
        self.assertIs(await self.api_call("adjustUserAccountBalance", "alice", -0.1, "x"), True)
        self.assertEqual(self.store.read(thdUser, "alice").balance, 615)
        self.assertEqual(await self.api_call("getUserAccountBalance", "alice", ""), 6.15)
        latest = self.store.read(thdListTransactions, limit=2)
        self.assertEqual(
            [(t.amount, t.reason, t.comment, t.site) for t in latest],
            [(-10, "adjust", "x", "hq"), (125, "adjust", "top-up", "hq")],
        )
        self.assertEqual(self.changed_tables(head), {"accounts"})
        self.assertEqual(
            self.audit()[-2:],
            [("xmlrpc", "balance.adjust", "alice"), ("xmlrpc", "balance.adjust", "alice")],
        )

    async def test_float_amounts_convert_at_the_boundary(self) -> None:
        """0.1 + 0.2 is 0.30, 1.005 rounds half up to 1.01; integers are amounts too."""
        await self.api_call("setUserAccountBalance", "bob", 0, "reset", "")
        await self.api_call("adjustUserAccountBalance", "bob", 0.1, "", "")
        await self.api_call("adjustUserAccountBalance", "bob", 0.2, "", "")
        self.assertEqual(self.store.read(thdUser, "bob").balance, 30)
        await self.api_call("adjustUserAccountBalance", "bob", 1.005, "", "")
        self.assertEqual(self.store.read(thdUser, "bob").balance, 131)
        await self.api_call("adjustUserAccountBalance", "bob", 2, "", "")
        self.assertEqual(self.store.read(thdUser, "bob").balance, 331)

    async def test_bad_amounts(self) -> None:
        """Not a number, not finite, absurdly large: a fault, and nothing changes."""
        for amount, message in (
            ("5", "the adjustment must be a number"),
            (True, "the adjustment must be a number"),
            (float("nan"), "the adjustment must be a finite number"),
            (float("inf"), "the adjustment must be a finite number"),
            (1e300, "is too large"),
        ):
            fault = await self.fault("adjustUserAccountBalance", "alice", amount, "", "")
            self.assertEqual(fault.faultCode, api.FAULT_INVALID)
            self.assertIn(message, fault.faultString)
        fault = await self.fault("adjustUserAccountBalance", "nobody", 1.0, "", "")
        self.assertEqual(fault.faultString, "no user named 'nobody'")
        self.assertEqual(self.store.read(thdUser, "alice").balance, 500)

    async def test_setUserAccountBalance(self) -> None:
        """One "set" transaction for the difference; setting the same balance is a no-op."""
        self.assertIs(
            await self.api_call("setUserAccountBalance", "alice", 2.5, "term start", ""), True
        )
        self.assertEqual(self.store.read(thdUser, "alice").balance, 250)
        latest = self.store.read(thdListTransactions, limit=1)[0]
        self.assertEqual((latest.amount, latest.reason), (-250, "set"))
        await self.api_call("setUserAccountBalance", "alice", 2.5, "again", "")
        self.assertEqual(self.store.read(thdListTransactions, limit=1)[0].comment, "term start")
        await self.api_call("setUserAccountBalance", "alice", -1.5, "owes", "")
        self.assertEqual(self.store.read(thdUser, "alice").balance, -150)
        self.assertEqual(
            [a for a in self.audit() if a[1] == "balance.set"],
            [("xmlrpc", "balance.set", "alice")] * 2,
        )

    async def test_setUserProperty(self) -> None:
        """Each property from its string form; a bad value is a fault."""
        head = self.head()
        for prop, value, expected in (
            ("full-name", " Alice Q. Example ", "Alice Q. Example"),
            ("email", "alice@example.org", "alice@example.org"),
            ("balance", "7.5", "7.50"),
            ("disabled", "TRUE", "true"),
            ("disabled-print", "false", "false"),
            ("restricted", "false", "false"),
        ):
            self.assertIs(await self.api_call("setUserProperty", "alice", prop, value), True)
            got = await self.api_call("getUserProperty", "alice", prop)
            self.assertEqual(got, expected, prop)
        user = self.store.read(thdUser, "alice")
        self.assertEqual(
            (user.full_name, user.balance, user.restricted), ("Alice Q. Example", 750, False)
        )
        self.assertEqual(self.changed_tables(head), {"users", "accounts"})
        self.assertEqual(
            [a[1] for a in self.audit() if a[0] == "xmlrpc"],
            [
                "user.update",
                "user.update",
                "balance.set",
                "user.disable",
                "user.enable",
                "user.set-credit",
            ],
        )
        for prop, value, message in (
            ("disabled", "maybe", 'disabled must be "true" or "false"'),
            ("balance", "lots", "balance: 'lots' is not an amount"),
            ("balance", "1.234", "has more than 2 decimal places"),
            ("full-name", "x" * 201, "longer than 200 characters"),
            ("notes", "x", "unknown user property 'notes'"),
        ):
            fault = await self.fault("setUserProperty", "alice", prop, value)
            self.assertEqual(fault.faultCode, api.FAULT_INVALID, prop)
            self.assertIn(message, fault.faultString)

    async def test_addNewUser(self) -> None:
        """A new user with a zero balance; an existing name is a fault."""
        self.assertIs(await self.api_call("addNewUser", "carol"), True)
        self.assertIs(await self.api_call("isUserExists", "carol"), True)
        self.assertEqual(await self.api_call("getUserAccountBalance", "carol", ""), 0.0)
        self.assertEqual(await self.api_call("listUserAccounts", 0, 10), ["alice", "bob", "carol"])
        self.assertIn(("xmlrpc", "user.add", "carol"), self.audit())
        fault = await self.fault("addNewUser", "carol")
        self.assertEqual(
            (fault.faultCode, fault.faultString), (api.FAULT_EXISTS, "user 'carol' already exists")
        )
        fault = await self.fault("addNewUser", "   ")
        self.assertEqual(fault.faultString, "the username must not be empty")

    async def test_addUserToGroup(self) -> None:
        """Into an existing group, once; an unknown group or user is a fault."""
        self.assertIs(await self.api_call("addUserToGroup", "bob", "staff"), True)
        self.assertIs(await self.api_call("addUserToGroup", "bob", "staff"), True)
        bob = self.store.read(thdUser, "bob")
        self.assertEqual(self.store.read(thdGroupsOf, bob.id), ["staff"])
        self.assertEqual(
            [a for a in self.audit() if a[1] == "group.add-member"],
            [("xmlrpc", "group.add-member", "staff")],
        )
        fault = await self.fault("addUserToGroup", "bob", "nowhere")
        self.assertEqual(
            (fault.faultCode, fault.faultString), (api.FAULT_NOT_FOUND, "no group named 'nowhere'")
        )
        fault = await self.fault("addUserToGroup", "nobody", "staff")
        self.assertEqual(fault.faultString, "no user named 'nobody'")


class RefusalTests(APIBase):
    """Tokens, malformed calls and failures: faults, never stack traces."""

    async def test_wrong_token(self) -> None:
        """Every method refuses a wrong token, and changes nothing."""
        calls: list[tuple[str, tuple[Any, ...]]] = [
            ("isUserExists", ("alice",)),
            ("getUserAccountBalance", ("alice", "")),
            ("adjustUserAccountBalance", ("alice", 100.0, "", "")),
            ("setUserAccountBalance", ("alice", 100.0, "", "")),
            ("getUserProperty", ("alice", "email")),
            ("setUserProperty", ("alice", "email", "evil@x.org")),
            ("addNewUser", ("mallory",)),
            ("listUserAccounts", (0, 10)),
            ("lookUpUserNameByCardNo", ("1001",)),
            ("addUserToGroup", ("alice", "staff")),
        ]
        for method, args in calls:
            for token in ("wrong", TOKEN[:-1], TOKEN + "x", ""):
                fault = await self.fault(method, *args, token=token)
                self.assertEqual(
                    (fault.faultCode, fault.faultString),
                    (api.FAULT_AUTH, "invalid authentication token"),
                )
                # Keep the per-address throttle out of this test.
                self.throttle_clock.advance(3600)
        user = self.store.read(thdUser, "alice")
        self.assertEqual((user.balance, user.email), (500, "a@x.org"))
        self.assertEqual([a for a in self.audit() if a[0] == "xmlrpc"], [])

    async def test_token_must_be_a_string(self) -> None:
        """A token that is not a string, or no arguments at all, is refused."""
        fault = await self.fault("isUserExists", "alice", token=12345)  # type: ignore[arg-type]
        self.assertEqual(fault.faultCode, api.FAULT_AUTH)
        try:
            await self.call("api.listUserAccounts")
        except xmlrpc.client.Fault as fault:
            self.assertEqual(fault.faultCode, api.FAULT_AUTH)
        else:
            self.fail("no fault")

    async def test_repeated_wrong_tokens_are_slowed(self) -> None:
        """After a few wrong tokens from one address, even the right one waits."""
        for _ in range(4):
            await self.fault("isUserExists", "alice", token="guess")
        fault = await self.fault("isUserExists", "alice")
        self.assertEqual(fault.faultCode, api.FAULT_AUTH)
        self.assertIn("too many failed attempts; try again in", fault.faultString)
        self.throttle_clock.advance(120)
        self.assertIs(await self.api_call("isUserExists", "alice"), True)

    async def test_unknown_method(self) -> None:
        """A method PaperCut has and sitesrv does not (or nonsense) names itself."""
        for method in ("api.getTotalUsers", "system.listMethods", "nonsense"):
            try:
                await self.call(method, TOKEN)
            except xmlrpc.client.Fault as fault:
                self.assertEqual(fault.faultCode, api.FAULT_NO_METHOD)
                self.assertEqual(fault.faultString, f"no such method: {method}")
            else:
                self.fail(f"{method} answered")

    async def test_wrong_number_of_arguments(self) -> None:
        """The fault says which arguments the method takes."""
        fault = await self.fault("isUserExists")
        self.assertEqual(
            (fault.faultCode, fault.faultString),
            (api.FAULT_INVALID, "api.isUserExists takes (authToken, userName)"),
        )
        fault = await self.fault("getUserProperty", "alice", "email", "extra")
        self.assertIn("(authToken, userName, propertyName)", fault.faultString)

    async def test_wrong_argument_types(self) -> None:
        """A username that is not a string is a fault naming the argument."""
        fault = await self.fault("isUserExists", 42)
        self.assertEqual(fault.faultString, "the username must be a string")
        fault = await self.fault("getUserAccountBalance", "alice", 7)
        self.assertEqual(fault.faultString, "accountName must be a string")

    async def test_malformed_xml(self) -> None:
        """Not XML-RPC at all: a fault in XML, no stack trace."""
        status, body = await self.post(b"<methodCall><methodName>api.isUserExists")
        self.assertEqual(status, 200)
        self.assertIn(b"<fault>", body)
        self.assertIn(b"Can't deserialize input", body)
        self.assertNotIn(TRACEBACK.encode(), body)

    async def test_oversized_request(self) -> None:
        """A body over the limit is refused before it is parsed."""
        padding = b"x" * (api.MAX_BODY + 1)
        call = xmlrpc.client.dumps((TOKEN, "alice"), "api.isUserExists").encode()
        status, body = await self.post(call.replace(b"alice", padding))
        self.assertEqual(status, 200)
        self.assertIn(b"request larger than 65536 bytes", body)

    async def test_get_is_not_allowed(self) -> None:
        """Only POST: GET answers 405, without a stack trace."""
        status, body = await self.post(b"", method="GET")
        self.assertEqual(status, 405)
        self.assertNotIn(TRACEBACK.encode(), body)

    async def test_internal_error(self) -> None:
        """A failure inside is one sentence for the caller; the details go to the log."""

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the disk caught fire at /var/lib/sitesrv")

        self.api.read = broken
        fault = await self.fault("isUserExists", "alice")
        self.assertEqual(
            (fault.faultCode, fault.faultString),
            (api.FAULT_INTERNAL, "internal error; the server's log has the details"),
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class MountingTests(SynchronousTestCase):
    """Served on a primary with a token; never on a site, nor without a token."""

    def test_primary_with_token(self) -> None:
        """The resource is at /rpc/api/xmlrpc and accepts POST only."""
        server = make_server(self, web={"xmlrpc_token": TOKEN})
        self.assertEqual(get(server, PATH).code, 405)

    def test_primary_without_token(self) -> None:
        """No token configured: not served at all."""
        self.assertEqual(get(make_server(self), PATH, b"POST").code, 404)

    def test_site(self) -> None:
        """A site never serves it."""
        self.assertEqual(get(make_server(self, "site"), PATH, b"POST").code, 404)

    def test_token_file(self) -> None:
        """The token may come from a file (its first line); a bad file stops the start."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "xmlrpc.token")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"  {TOKEN}  \nignored\n")
        server = make_server(self, web={"xmlrpc_token_file": path})
        self.assertEqual(get(server, PATH).code, 405)
        missing = os.path.join(directory, "missing")
        error = self.assertRaises(
            StartupError, make_server, self, web={"xmlrpc_token_file": missing}
        )
        self.assertEqual(
            str(error),
            f"cannot read web.xmlrpc_token_file {missing}: No such file or directory",
        )
        with open(path, "w", encoding="utf-8") as f:
            f.write("short\n")
        error = self.assertRaises(StartupError, make_server, self, web={"xmlrpc_token_file": path})
        self.assertIn("the token must be at least 16 characters", str(error))
        with open(path, "w", encoding="utf-8") as f:
            f.write("")
        self.assertRaises(StartupError, make_server, self, web={"xmlrpc_token_file": path})


class RealServerTests(TestCase):
    """``twistd -n sitesrv --config`` with ``[web] xmlrpc_token_file``, called over TCP."""

    timeout = 60

    async def test_running_primary(self) -> None:
        reason = twistd_unavailable()
        if reason is not None:
            raise SkipTest(reason)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        node = write_primary_config(directory, "hq")
        token_file = os.path.join(directory, "xmlrpc.token")
        with open(token_file, "w", encoding="utf-8") as f:
            f.write(TOKEN + "\n")
        with open(node.config, "a", encoding="utf-8") as f:
            f.write(f'\n[web]\nxmlrpc_token_file = "{token_file}"\n')
        tls_init(node)
        server = ServerProcess(node).start(self)
        await wait_for_health(server, lambda h: h.code == 200, "primary answers")
        url = f"http://127.0.0.1:{node.web_port}{PATH}"

        def script() -> tuple[Any, ...]:
            # What a PaperCut script does, start to finish.
            p = proxy(url)
            p.api.addNewUser(TOKEN, "dave")
            p.api.adjustUserAccountBalance(TOKEN, "dave", 3.5, "welcome", "")
            p.api.setUserProperty(TOKEN, "dave", "full-name", "Dave Example")
            try:
                p.api.isUserExists("wrong-token", "dave")
            except xmlrpc.client.Fault as fault:
                refused = fault.faultString
            return (
                p.api.getUserAccountBalance(TOKEN, "dave", ""),
                p.api.getUserProperty(TOKEN, "dave", "full-name"),
                refused,
            )

        balance, name, refused = await deferToThread(script)
        self.assertEqual((balance, name), (3.5, "Dave Example"))
        self.assertEqual(refused, "invalid authentication token")
        self.assertEqual(
            server.count(r"XML-RPC api\.isUserExists from .* refused: wrong token"), 1
        )
        self.assertEqual(server.count("Traceback"), 0)

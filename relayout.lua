-- relayout.lua: qrunner's default policy, VPOP3's "Lua SMTP Relay Control" API.
--
-- qrunner calls CheckFile once for every queued outbound message, oldest
-- first, and once per configured sender (the globals senderid and sendername
-- say which). Change the Actions table and return it:
--
--   Actions.SkipSend  true (or a number other than 0): hold the message for
--                     now; a later run asks again. false/nil/0: send it.
--   Actions.Priority  1..100, default 50. 100 is sent first, 1 last.
--   Actions.Reason    why it is held; shown by `qrunner status` and logged.
--
-- Arguments: Filename (the queue file), Actions, Size (bytes), CreationTime
-- ("YYYYMMDDHHMMSS", local time), ReturnPath (envelope sender, "" for
-- bounces), Recipients (list), HeaderData (name -> value, any case:
-- HeaderData.subject), HeaderLines (raw header fields). Headers are read
-- from the queue only if the script touches HeaderData or HeaderLines.
--
-- This is the first example from VPOP3's documentation: messages over
-- 10,000,000 bytes wait while the hour is 8..18 (the code tests hour > 7
-- and hour < 19, so at 07:30 they still go), and messages over 5,000,000
-- bytes go last. The Reason line is qrunner's addition (VPOP3's example
-- leaves it empty; qrunner then records "no reason given").
--
-- Try it without touching the queue:
--   qrunner plan --script relayout.lua --now 2026-11-25T10:00:00

function CheckFile(filename, actions, size, createtime, mailfrom, recipients, headerdata, headerlines)

 time = os.date("*t");
 if size > 10000000 and (time.hour > 7 and time.hour < 19) then
  actions["SkipSend"] = 1;
  actions["Reason"] = "over 10 MB: waits until 19:00";
 end;

 if size > 5000000 then
  actions["Priority"] = 1;
 end;

 return actions;
end;

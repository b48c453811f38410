function CheckFile(filename, actions, size, createtime, mailfrom, recipients, headerdata, headerlines)

 time = os.date("*t");
 if size > 10000000 and (time.hour > 7 and time.hour < 19) then
  actions["SkipSend"] = 1;
 end;

 if size > 5000000 then
  actions["Priority"] = 1;
 end;

 return actions;
end;
